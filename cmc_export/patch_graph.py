"""The exported graphs: one nn.Module per inference mode, with the I/O names of docs/DESIGN.md.

`CMCNet.predict` takes a `mode` string and optional images; an exported graph must have a
fixed signature instead, so each mode gets a thin wrapper whose forward() arguments are
exactly the graph inputs (`image_a`, `image_b`) and whose outputs are `MODE_OUTPUTS[mode]`:
`probs`, and for the fused graph also each decoder's softmax (`probs_a`, `probs_b`).

One fused graph with three outputs, not a second graph for quality control: the branch
softmaxes are intermediates the fused mean computes anyway, so returning them costs only
their copy out of the runtime. Measured on OpenVINO fp32 (tiny preset, K = 6, a batch of
8 tiles of 32^3, 2 shared cores of an AMD EPYC, best of 40 interleaved runs, 2026-12-04):
1 output 572 ms, 3 outputs 589 ms per batch (+3 %); the same graph asked for `probs` only
581 ms. A second graph for QC would run the network a second time or double the files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cmc_common.contract import GRAPH_OUTPUT, MODE_OUTPUTS, MODES, Mode

if TYPE_CHECKING:
    from cmc_train.network import CMCNet

class _PatchGraph(nn.Module):
    """Holds the network; subclasses fix forward()'s arguments, which name the graph inputs,
    and return `MODE_OUTPUTS[mode]` in that order."""

    mode: str

    def __init__(self, net: CMCNet) -> None:
        super().__init__()
        self.net = net


class FusedPatchGraph(_PatchGraph):
    """(image_a, image_b) -> (probs, probs_a, probs_b): the mean of the two branch softmaxes
    (exactly `CMCNet.predict(..., "fused")`) and each branch's softmax."""

    mode = Mode.FUSED

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from cmc_train.network.cmc_net import class_softmax

        out = self.net(image_a, image_b)
        probs_a, probs_b = class_softmax(out.logits_a), class_softmax(out.logits_b)
        return 0.5 * (probs_a + probs_b), probs_a, probs_b


class ModalityAPatchGraph(_PatchGraph):
    """image_a -> probs of branch a (the network feeds the image to both branches)."""

    mode = Mode.A

    def forward(self, image_a: torch.Tensor) -> torch.Tensor:
        return self.net.predict(image_a, None, Mode.A)


class ModalityBPatchGraph(_PatchGraph):
    """image_b -> probs of branch b (the network feeds the image to both branches)."""

    mode = Mode.B

    def forward(self, image_b: torch.Tensor) -> torch.Tensor:
        return self.net.predict(None, image_b, Mode.B)


_WRAPPERS: dict[str, type[_PatchGraph]] = {
    Mode.FUSED: FusedPatchGraph,
    Mode.A: ModalityAPatchGraph,
    Mode.B: ModalityBPatchGraph,
}


def patch_graph(net: CMCNet, mode: str) -> nn.Module:
    """The eval-mode graph for `mode`; its forward() arguments are `MODE_INPUTS[mode]`."""
    if mode not in _WRAPPERS:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {list(MODES)}")
    return _WRAPPERS[mode](net).eval()


def torch_runner(graph: nn.Module, outputs: Sequence[str] = (GRAPH_OUTPUT,)
                 ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """A `patch_graph` wrapper as a gate runner (the PyTorch reference): named numpy inputs
    -> the named `outputs` joined along the class axis (`cmc_export.gates.join_outputs`)."""
    from cmc_export.gates import join_outputs

    names = MODE_OUTPUTS[str(graph.mode)]

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            feeds = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in inputs.items()}
            result = graph(**feeds)
        values = result if isinstance(result, tuple) else (result,)
        produced = {n: v.numpy() for n, v in zip(names, values, strict=True)}
        return join_outputs([produced[n] for n in outputs])

    return run

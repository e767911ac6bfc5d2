"""The exported graphs: one nn.Module per inference mode, with the I/O names of docs/DESIGN.md.

`CMCNet.predict` takes a `mode` string and optional images; an exported graph must have a
fixed signature instead, so each mode gets a thin wrapper whose forward() arguments are
exactly the graph inputs (`image_a`, `image_b`) and whose output is `probs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cmc_common.contract import MODES

if TYPE_CHECKING:
    from cmc_train.network import CMCNet



class _PatchGraph(nn.Module):
    """Holds the network; subclasses fix forward()'s arguments, which name the graph inputs."""

    def __init__(self, net: CMCNet) -> None:
        super().__init__()
        self.net = net


class FusedPatchGraph(_PatchGraph):
    """(image_a, image_b) -> probs: mean of the two branch softmaxes."""

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        return self.net.predict(image_a, image_b, "fused")


class ModalityAPatchGraph(_PatchGraph):
    """image_a -> probs of branch a (the network feeds the image to both branches)."""

    def forward(self, image_a: torch.Tensor) -> torch.Tensor:
        return self.net.predict(image_a, None, "a")


class ModalityBPatchGraph(_PatchGraph):
    """image_b -> probs of branch b (the network feeds the image to both branches)."""

    def forward(self, image_b: torch.Tensor) -> torch.Tensor:
        return self.net.predict(None, image_b, "b")


_WRAPPERS: dict[str, type[_PatchGraph]] = {
    "fused": FusedPatchGraph,
    "a": ModalityAPatchGraph,
    "b": ModalityBPatchGraph,
}


def patch_graph(net: CMCNet, mode: str) -> nn.Module:
    """The eval-mode graph for `mode`; its forward() arguments are `MODE_INPUTS[mode]`."""
    if mode not in _WRAPPERS:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {list(MODES)}")
    return _WRAPPERS[mode](net).eval()


def torch_runner(graph: nn.Module) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The graph as a gate runner: named numpy inputs -> numpy probs (the PyTorch reference)."""

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            feeds = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in inputs.items()}
            return graph(**feeds).numpy()

    return run

"""The interface every patch runtime implements (the error for one that cannot run,
`RuntimeUnavailable`, is in `cmc_serve.errors` with the other refusals of a run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PatchRuntime(Protocol):
    """Runs one patch graph on a batch of tiles.

    `run` takes the graph's inputs by name (`image_a`/`image_b`, float32 [N, 1, P, P, P],
    N <= max_batch) and returns softmax probabilities float32 [N, K, P, P, P].
    `run_outputs` returns the named outputs of one graph call, in that order; `outputs`
    lists those the graph offers (`probs` first; the fused graph's `probs_a` / `probs_b`
    where it was exported with them and the runtime returns them).
    """

    name: str  # a contract Runtime: onnxruntime | openvino | tensorrt | triton
    device: str  # a contract Device (cpu | cuda); "server" for triton
    precision: str  # a contract Precision: fp32 | fp16 | bf16 | int8
    max_batch: int
    outputs: tuple[str, ...]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def run_outputs(self, inputs: dict[str, np.ndarray],
                    names: Sequence[str]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def check_outputs(names: Sequence[str], offered: Sequence[str], runtime: str) -> None:
    """ValueError unless every output asked of `run_outputs` is one the graph offers."""
    missing = [n for n in names if n not in offered]
    if missing or not names:
        raise ValueError(f"{runtime}: graph outputs are {list(offered)}, asked for "
                         f"{list(names)}")


def check_batch(inputs: dict[str, np.ndarray], names: tuple[str, ...], max_batch: int,
                runtime: str) -> int:
    """Validate the input dict of one `run` call against the graph; return N."""
    if set(inputs) != set(names):
        raise ValueError(f"{runtime}: graph inputs are {list(names)}, got {sorted(inputs)}")
    sizes = {a.shape[0] for a in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"{runtime}: inputs disagree on batch size {sorted(sizes)}")
    n = sizes.pop()
    if not 1 <= n <= max_batch:
        raise ValueError(f"{runtime}: batch of {n} tiles, this runtime takes 1..{max_batch}")
    return n

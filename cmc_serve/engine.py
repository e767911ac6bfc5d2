"""`Segmenter`: sliding-window inference of an exported CMC model over a whole volume.

The inputs are pre-processed volumes [D, H, W] on one voxel grid (see `cmc_serve.preprocess`);
they may be np.memmap, since tiles are read one by one and nothing volume-sized besides the
uint8 labels (and the probabilities, if asked for) is allocated. While the runtime works on
one batch of tiles a background thread gathers the next batch, so reading and copying
tiles overlaps with inference; the stitcher keeps only about one patch depth of
accumulators (see `cmc_serve.stitching`).

Arrays carry no identity: a caller that fuses two images passes what each states about
itself (`identity_a`, `identity_b`: `cmc_serve.compatibility.ImageFacts`) and the fused
call is refused, by the same rules as `cmc segment`, when they are different patients or
unrelated frames of reference (unless `assumptions.registered`).

`segment(..., branches=True)` (quality control) also returns the fused pass's two decoders
(`SegmentResult.branches`, `cmc_serve.qc.inputs.BranchOutputs`) from the same graph calls,
stitched in the same bounded slabs. A fused graph exported before it had the branch
outputs (or a Triton repository that does not declare them) gives None: QC then reports
the branch signal unavailable rather than invent it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmc_common.contract import (
    AUTO,
    BRANCH_OUTPUTS,
    GRAPH_OUTPUT,
    MODE_INPUTS,
    MODES,
    Device,
    Mode,
    check_overlap,
)
from cmc_common.errors import CmcError
from cmc_serve.compatibility import Assumptions, ImageFacts, check_combination
from cmc_serve.model_dir import ModelInfo
from cmc_serve.qc.inputs import BranchOutputs
from cmc_serve.runtimes import PatchRuntime, open_runtime
from cmc_serve.runtimes.select import check_server, resolve_precision
from cmc_serve.stitching import SlabStitcher
from cmc_serve.tiling import TileGrid, extract_patch, gaussian_importance

log = logging.getLogger(__name__)

# Test-time augmentation: identity plus a flip of each spatial axis of [N, C, D, H, W].
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))
# Finite-value checks read the inputs in chunks of this many slices (memmap friendly).
CHECK_SLICES = 16


class SegmenterInputError(CmcError, ValueError):
    """The images given to `Segmenter.segment` cannot be segmented as asked."""


@dataclass(frozen=True)
class SegmentResult:
    """Labels uint8 [D, H, W], probabilities float32 [K, D, H, W] if requested, and what ran
    (`precision_reason`: "requested", or why `auto` chose the precision). `branches`: the
    fused pass's two decoders when asked for and the graph returns them, else None."""

    labels: np.ndarray
    probs: np.ndarray | None
    mode: str
    runtime: str
    device: str
    precision: str
    precision_reason: str = "requested"
    branches: BranchOutputs | None = None


class Segmenter:
    """Segments pre-processed volumes with the graphs of one exported model directory.

    `model` is the directory or its already-loaded `ModelInfo` (a batch loads it once).
    Runtimes are opened per mode on first use (`open_runtime`; runtime "triton" sends the
    tiles to `server`) and kept; `close()` (or a `with` block) releases them.
    """

    def __init__(self, model: str | Path | ModelInfo, runtime: str = AUTO, device: str = Device.CPU,
                 precision: str = AUTO, overlap: float = 0.5, tta: bool = False,
                 batch_size: int | None = None, return_probs: bool = False,
                 accumulator_dtype: str = "float32", server: str | None = None) -> None:
        self.model = model if isinstance(model, ModelInfo) else ModelInfo.load(model)
        check_server(runtime, server)
        check_overlap(overlap)
        if accumulator_dtype not in ("float32", "float16"):
            raise ValueError(f"accumulator_dtype must be float32 or float16, got "
                             f"{accumulator_dtype!r}")
        self.runtime = runtime
        self.server = server
        self.device = device
        self.precision = precision
        self.overlap = overlap
        self.tta = tta
        self.batch_size = batch_size
        self.return_probs = return_probs
        self.accumulator_dtype = np.dtype(accumulator_dtype)
        self.weights = gaussian_importance(self.model.patch_size)
        self._runtimes: dict[str, PatchRuntime] = {}
        self._precision_reasons: dict[str, str] = {}

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for rt in self._runtimes.values():
            rt.close()
        self._runtimes.clear()

    def runtime_for(self, mode: str) -> PatchRuntime:
        """The (cached) runtime of `mode`, opened on first use."""
        if mode not in self._runtimes:
            rt = open_runtime(self.model, mode, self.runtime, self.device, self.precision,
                              self.batch_size, self.server)
            self._runtimes[mode] = rt
            self._precision_reasons[mode] = resolve_precision(
                self.model, mode, rt.name, rt.device, self.precision).reason
        return self._runtimes[mode]

    def segment(self, image_a: np.ndarray | None = None, image_b: np.ndarray | None = None,
                mode: str = "auto", *, identity_a: ImageFacts | None = None,
                identity_b: ImageFacts | None = None,
                assumptions: Assumptions | None = None,
                branches: bool = False) -> SegmentResult:
        """Segment one case; `mode` "auto" fuses when both images are given.

        With `identity_a`/`identity_b`, a fused call first passes
        `compatibility.check_combination` (CompatibilityError, a ValueError, if refused).
        `branches`: also return the fused pass's two decoders (module docstring).
        """
        mode = self._resolve_mode(image_a, image_b, mode)
        if mode == Mode.FUSED and (identity_a is not None or identity_b is not None):
            check_combination(identity_a or ImageFacts("image_a"),
                              identity_b or ImageFacts("image_b"), assumptions)
        images = {"image_a": image_a, "image_b": image_b}
        volumes, shape = _check_volumes({name: images[name] for name in MODE_INPUTS[mode]})
        runtime = self.runtime_for(mode)
        outputs = self._outputs(runtime, mode, branches)
        grid = TileGrid.build(shape, self.model.patch_size, self.overlap)
        stitcher = SlabStitcher(grid, self.model.num_classes, self.weights,
                                accumulator_dtype=self.accumulator_dtype,
                                keep_probs=self.return_probs, branches=len(outputs) > 1)
        origins = list(grid.origins())
        batches = [origins[i:i + runtime.max_batch]
                   for i in range(0, len(origins), runtime.max_batch)]
        log.info("segment %s: volume %s, %d tiles of %s in %d batches on %s/%s/%s", mode,
                 shape, len(origins), grid.patch, len(batches), runtime.name, runtime.device,
                 runtime.precision)
        for batch, inputs in zip(batches, self._prefetch(volumes, batches, grid), strict=True):
            probs = self._infer(runtime, inputs, outputs)
            for origin, tile in zip(batch, probs, strict=True):
                stitcher.add(origin, tile)
        labels, probs_out = stitcher.result()
        return SegmentResult(labels=labels, probs=probs_out, mode=mode, runtime=runtime.name,
                             device=runtime.device, precision=runtime.precision,
                             precision_reason=self._precision_reasons.get(mode, "requested"),
                             branches=stitcher.branch_result() if len(outputs) > 1 else None)

    def _outputs(self, runtime: PatchRuntime, mode: str, branches: bool) -> tuple[str, ...]:
        """The graph outputs to fetch: `probs`, and the branches where asked and offered."""
        if not branches or mode != Mode.FUSED:
            return (GRAPH_OUTPUT,)
        if not set(BRANCH_OUTPUTS) <= set(runtime.outputs):
            log.info("segment: the fused graph on %s has no branch outputs %s (exported "
                     "before them): branch agreement unavailable", runtime.name,
                     list(BRANCH_OUTPUTS))
            return (GRAPH_OUTPUT,)
        return (GRAPH_OUTPUT, *BRANCH_OUTPUTS)

    def _resolve_mode(self, image_a: np.ndarray | None, image_b: np.ndarray | None,
                      mode: str) -> str:
        available = self.model.modes
        if mode == AUTO:
            if image_a is not None and image_b is not None and Mode.FUSED in available:
                mode = Mode.FUSED
            elif image_a is not None and Mode.A in available:
                mode = Mode.A
            elif image_b is not None and Mode.B in available:
                mode = Mode.B
            else:
                given = [n for n, im in ((Mode.A, image_a), (Mode.B, image_b)) if im is not None]
                raise SegmenterInputError(f"no exported mode of {self.model.root} fits the images "
                                          f"given ({given or 'none'}; available modes "
                                          f"{list(available)})")
        if mode not in MODES:
            raise SegmenterInputError(f"unknown mode {mode!r} (expected auto or one of "
                                      f"{list(MODES)})")
        if mode not in available:
            raise SegmenterInputError(f"mode {mode!r} is not exported in {self.model.root} "
                                      f"(available: {list(available)})")
        need = {"image_a": image_a, "image_b": image_b}
        missing = [n for n in MODE_INPUTS[mode] if need[n] is None]
        if missing:
            raise SegmenterInputError(f"mode {mode!r} needs {list(MODE_INPUTS[mode])}; missing "
                                      f"{missing}")
        return mode

    def _prefetch(self, volumes: dict[str, np.ndarray], batches: list[list[tuple[int, int, int]]],
                  grid: TileGrid) -> Iterator[dict[str, np.ndarray]]:
        """Yield each batch's input tensors, gathering batch i+1 while batch i runs."""
        def gather(batch: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
            return {name: np.stack([extract_patch(vol, o, grid.patch) for o in batch])[:, None]
                    for name, vol in volumes.items()}

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmc-tiles") as pool:
            pending = pool.submit(gather, batches[0])
            for i in range(len(batches)):
                ready = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(gather, batches[i + 1])
                yield ready

    def _infer(self, runtime: PatchRuntime, inputs: dict[str, np.ndarray],
               outputs: tuple[str, ...]) -> np.ndarray:
        """The batch's `outputs` joined along the class axis ([N, len(outputs) * K, ...])."""
        def run(feed: dict[str, np.ndarray]) -> np.ndarray:
            if len(outputs) == 1:
                return runtime.run(feed)
            return np.concatenate(runtime.run_outputs(feed, outputs), axis=1)

        if not self.tta:
            return run(inputs)
        total: np.ndarray | None = None
        for axes in TTA_FLIPS:
            flipped = {k: np.flip(v, axes) if axes else v for k, v in inputs.items()}
            out = run(flipped)
            out = np.flip(out, axes) if axes else out
            total = out.copy() if total is None else total + out
        assert total is not None
        return total / len(TTA_FLIPS)


def _check_volumes(given: dict[str, object]) -> tuple[dict[str, np.ndarray],
                                                      tuple[int, int, int]]:
    """Validate shapes, dtypes and finiteness; return the arrays and their [D, H, W] shape."""
    shapes = {}
    volumes: dict[str, np.ndarray] = {}
    for name, vol in given.items():
        if not isinstance(vol, np.ndarray):
            raise SegmenterInputError(f"{name} must be a numpy array, got {type(vol).__name__}")
        if vol.ndim != 3 or min(vol.shape) < 1:
            raise SegmenterInputError(f"{name} must be a non-empty [D, H, W] volume, got shape "
                                      f"{vol.shape}")
        if not (np.issubdtype(vol.dtype, np.floating) or np.issubdtype(vol.dtype, np.integer)):
            raise SegmenterInputError(f"{name} has dtype {vol.dtype}; expected a real number type")
        for start in range(0, vol.shape[0], CHECK_SLICES):
            if not np.isfinite(vol[start:start + CHECK_SLICES]).all():
                last = min(start + CHECK_SLICES, vol.shape[0]) - 1
                raise SegmenterInputError(f"{name} contains NaN or infinite values (first in "
                                          f"slices {start}..{last})")
        shapes[name] = tuple(int(s) for s in vol.shape)
        volumes[name] = vol
    if len(set(shapes.values())) != 1:
        raise SegmenterInputError(f"image shapes differ {shapes}: both modalities must be on one "
                                  "voxel grid (resample first)")
    d, h, w = next(iter(shapes.values()))
    return volumes, (d, h, w)

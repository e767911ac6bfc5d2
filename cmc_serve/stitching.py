"""Bounded-memory blending of tile probabilities into a label volume.

A full-volume float32 accumulator for K classes costs 4*K bytes per voxel (a 512x512x400
CT with K=14 is 5.9 GB), far more than the uint8 labels we return. The volume is cut along
its two slowest axes D and H at every tile start/end into blocks (a depth slab by a height
strip, full width); a block's accumulator exists only while tiles touching it are
outstanding. When the last one is in, the block is normalised, argmax'ed into the uint8
output (and copied into the optional probability output) and freed. With tiles arriving
D-major, then H-major, the slab the current tile row finishes is freed strip by strip as the
row moves down H while the next slab fills strip by strip behind it, so about half a patch
depth of the plane is alive (slabs alone, freed whole, kept a full patch depth alive;
BENCHMARKS.md has the measured peak memory).

The per-voxel arithmetic is the same as a naive full-volume accumulation in the same tile
order, whatever the blocks (sum of p*w, then divide by the sum of w), so the probabilities
are bit-identical to it with float32 accumulators. When only labels are asked for, the weight sum is not kept at all:
dividing a voxel's K sums by the same positive number cannot change which is largest, so the
argmax of the sums is the label (it can differ only where rounding the quotients would make
two classes tie exactly). That saves 4 bytes per voxel of every live block, a fifth of the
accumulators with K = 8 in float16.

With `branches` (quality control's branch agreement) a tile carries the fused graph's three
outputs joined along the class axis, [probs, probs_a, probs_b] (3K channels), blended alike
in the same block accumulators, so the bound stays as above (three times the
channels). Each finished block gives each decoder's argmax into a uint8 volume and, per
fused label, the sum and count of the fused probability margin (top-1 minus top-2 of the
normalised probabilities): nothing volume-sized in float is ever allocated for them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cmc_serve.qc.inputs import BranchOutputs
from cmc_serve.tiling import TileGrid, clip_box

FINALISE_SLICES = 4  # slices of a block normalised at once (bounds the temporaries)


@dataclass
class _Block:
    """Depth slab [start, stop) by height strip [top, bottom), the volume's full width."""

    start: int
    stop: int
    top: int
    bottom: int
    remaining: int
    acc: np.ndarray | None = None  # [C, d, h, W] weighted sum (C = K, or 3K with branches)
    weight: np.ndarray | None = None  # [d, h, W] weight sum (float32): probs or branches


def _nbytes(block: _Block) -> int:
    return sum(a.nbytes for a in (block.acc, block.weight) if a is not None)


def _cuts(starts: Sequence[int], patch: int, size: int) -> tuple[list[int], dict[int, int]]:
    """The positions where a tile's visible part starts or stops along one axis, and the
    index of each in that sorted list (a tile spans the pieces between its two cuts)."""
    cuts = sorted({c for s in starts for c in clip_box(s, patch, size)[:2]})
    return cuts, {c: i for i, c in enumerate(cuts)}


def _spans(cuts: list[int], starts: Sequence[int], patch: int, size: int) -> list[int]:
    """How many tile positions along one axis touch each piece between cuts."""
    boxes = [clip_box(s, patch, size)[:2] for s in starts]
    return [sum(1 for b0, b1 in boxes if b0 < hi and lo < b1)
            for lo, hi in itertools.pairwise(cuts)]


class SlabStitcher:
    """Accumulates tiles of one TileGrid; `result()` returns (labels, probs or None) and,
    with `branches`, `branch_result()` the two decoders' outputs (module docstring)."""

    def __init__(self, grid: TileGrid, num_classes: int, weights: np.ndarray, *,
                 accumulator_dtype: type[np.floating] | np.dtype = np.float32,
                 keep_probs: bool = False, branches: bool = False) -> None:
        if not 2 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in 2..255 for uint8 labels, got {num_classes}")
        if weights.shape != grid.patch:
            raise ValueError(f"weights shape {weights.shape} != patch {grid.patch}")
        self.grid = grid
        self.num_classes = num_classes
        self.weights = weights.astype(np.float32, copy=False)
        self.acc_dtype = np.dtype(accumulator_dtype)
        if self.acc_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"accumulator dtype must be float32 or float16, got {self.acc_dtype}")
        depth, height, width = grid.shape
        self.labels = np.empty(grid.shape, dtype=np.uint8)
        self.probs = (np.empty((num_classes, depth, height, width), dtype=np.float32)
                      if keep_probs else None)
        self.branches = branches
        self.channels = num_classes * (3 if branches else 1)
        self.branch_labels = (np.empty((2, depth, height, width), dtype=np.uint8)
                              if branches else None)
        self.margin_sum = np.zeros(num_classes, dtype=np.float64)
        self.voxel_count = np.zeros(num_classes, dtype=np.int64)
        self._d_cuts, self._d_index = _cuts(grid.starts[0], grid.patch[0], depth)
        self._h_cuts, self._h_index = _cuts(grid.starts[1], grid.patch[1], height)
        self._blocks = self._make_blocks()
        self._added = 0
        self.live_bytes = 0
        self.peak_bytes = 0

    def _make_blocks(self) -> list[list[_Block]]:
        """[slab][strip]: each block expects one tile per (D, H) tile position touching it
        and per W position."""
        grid = self.grid
        rows = _spans(self._d_cuts, grid.starts[0], grid.patch[0], grid.shape[0])
        cols = _spans(self._h_cuts, grid.starts[1], grid.patch[1], grid.shape[1])
        per_w = len(grid.starts[2])
        return [[_Block(start=d0, stop=d1, top=h0, bottom=h1, remaining=r * c * per_w)
                 for (h0, h1), c in zip(itertools.pairwise(self._h_cuts), cols, strict=True)]
                for (d0, d1), r in zip(itertools.pairwise(self._d_cuts), rows, strict=True)]

    def add(self, origin: tuple[int, int, int], tile: np.ndarray) -> None:
        """Blend one tile's probabilities [C, P0, P1, P2] at `origin` (C: K, or 3K joined
        [probs, probs_a, probs_b] with branches)."""
        if tile.shape != (self.channels, *self.grid.patch):
            raise ValueError(f"tile shape {tile.shape} != {(self.channels, *self.grid.patch)}")
        (d0, d1, od), (h0, h1, oh), (w0, w1, ow) = (
            clip_box(o, p, n) for o, p, n in zip(origin, self.grid.patch, self.grid.shape, strict=True))
        ws = slice(ow, ow + w1 - w0)
        for slab in self._blocks[self._d_index[d0]:self._d_index[d1]]:
            for block in slab[self._h_index[h0]:self._h_index[h1]]:
                if block.remaining <= 0:
                    raise ValueError(f"tile at {origin} added twice (block {block.start}:"
                                     f"{block.stop} x {block.top}:{block.bottom} already "
                                     "complete)")
                if block.acc is None:
                    self._allocate(block)
                assert block.acc is not None
                ts = slice(od + block.start - d0, od + block.stop - d0)
                hs = slice(oh + block.top - h0, oh + block.bottom - h0)
                w = self.weights[ts, hs, ws]
                block.acc[:, :, :, w0:w1] += tile[:, ts, hs, ws] * w
                if block.weight is not None:
                    block.weight[:, :, w0:w1] += w
                block.remaining -= 1
                if block.remaining == 0:
                    self._finalise(block)
        self._added += 1

    def _allocate(self, block: _Block) -> None:
        shape = (block.stop - block.start, block.bottom - block.top, self.grid.shape[2])
        block.acc = np.zeros((self.channels, *shape), dtype=self.acc_dtype)
        if self.probs is not None or self.branches:
            block.weight = np.zeros(shape, dtype=np.float32)
        self.live_bytes += _nbytes(block)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _finalise(self, block: _Block) -> None:
        """Argmax (and normalise, if probabilities are kept) the block a few slices at a time:
        a whole-block float32 copy and int64 argmax would double its memory at its peak."""
        assert block.acc is not None
        k = self.num_classes
        rows = slice(block.top, block.bottom)
        for lo in range(0, block.stop - block.start, FINALISE_SLICES):
            hi = min(lo + FINALISE_SLICES, block.stop - block.start)
            out = (slice(block.start + lo, block.start + hi), rows)
            if self.probs is None and not self.branches:
                self.labels[out] = np.argmax(block.acc[:, lo:hi], axis=0)
                continue
            assert block.weight is not None
            probs = block.acc[:k, lo:hi].astype(np.float32)
            probs /= block.weight[lo:hi]
            if self.probs is None:  # the labels of a labels-only run, whatever QC asks
                self.labels[out] = np.argmax(block.acc[:k, lo:hi], axis=0)
            else:
                self.labels[out] = np.argmax(probs, axis=0)
                self.probs[(slice(None), *out)] = probs
            if self.branches:
                self._finalise_branches(block.acc[k:, lo:hi], probs, self.labels[out], out)
        self.live_bytes -= _nbytes(block)
        block.acc = block.weight = None

    def _finalise_branches(self, branch_acc: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                           out: tuple[slice, slice]) -> None:
        """Each decoder's labels and, per fused label, the fused margin's sum and count."""
        assert self.branch_labels is not None
        k = self.num_classes
        self.branch_labels[(0, *out)] = np.argmax(branch_acc[:k], axis=0)
        self.branch_labels[(1, *out)] = np.argmax(branch_acc[k:], axis=0)
        top_two = np.partition(probs, k - 2, axis=0)[k - 2:]
        flat = labels.ravel()
        self.margin_sum += np.bincount(flat, weights=(top_two[1] - top_two[0]).ravel(),
                                       minlength=k)
        self.voxel_count += np.bincount(flat, minlength=k)

    def branch_result(self) -> BranchOutputs:
        """The two decoders' labels and the fused margin per class (needs `branches`)."""
        if self.branch_labels is None:
            raise ValueError("branch_result() needs a stitcher made with branches=True")
        self.result()  # raises if incomplete
        return BranchOutputs(labels_a=self.branch_labels[0], labels_b=self.branch_labels[1],
                             margin_sum=self.margin_sum, voxel_count=self.voxel_count)

    @property
    def complete(self) -> bool:
        return all(b.remaining == 0 for slab in self._blocks for b in slab)

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels uint8 [D, H, W] and probabilities float32 [K, D, H, W] (if kept)."""
        if not self.complete:
            missing = len(self.grid) - self._added
            raise ValueError(f"stitching incomplete: {missing} of {len(self.grid)} tiles missing")
        return self.labels, self.probs

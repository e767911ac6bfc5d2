"""Bounded-memory blending of tile probabilities into a label volume.

A full-volume float32 accumulator for K classes costs 4*K bytes per voxel (a 512x512x400
CT with K=14 is 5.9 GB), far more than the uint8 labels we return. The volume is cut along
its slowest axis D into slabs at every tile start/end; a slab's accumulator exists only
while tiles touching it are outstanding. When the last one is in, the slab is normalised,
argmax'ed into the uint8 output (and copied into the optional probability output) and
freed. With tiles arriving D-major, at most about one patch depth of slabs is alive.

The per-voxel arithmetic is the same as a naive full-volume accumulation in the same tile
order (sum of p*w, then divide by the sum of w), so the probabilities are bit-identical to it
with float32 accumulators. When only labels are asked for, the weight sum is not kept at all:
dividing a voxel's K sums by the same positive number cannot change which is largest, so the
argmax of the sums is the label (it can differ only where rounding the quotients would make
two classes tie exactly). That saves 4 bytes per voxel of every live slab, a fifth of the
accumulators with K = 8 in float16.

With `branches` (quality control's branch agreement) a tile carries the fused graph's three
outputs joined along the class axis, [probs, probs_a, probs_b] (3K channels), blended alike
in the same slab accumulators, so the bound stays one patch depth (three times the
channels). Each finished slab gives each decoder's argmax into a uint8 volume and, per
fused label, the sum and count of the fused probability margin (top-1 minus top-2 of the
normalised probabilities): nothing volume-sized in float is ever allocated for them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cmc_serve.qc.inputs import BranchOutputs
from cmc_serve.tiling import TileGrid, clip_box

FINALISE_SLICES = 4  # slices of a slab normalised at once (bounds the temporaries)


@dataclass
class _Slab:
    start: int
    stop: int
    remaining: int
    acc: np.ndarray | None = None  # [C, d, H, W] weighted sum (C = K, or 3K with branches)
    weight: np.ndarray | None = None  # [d, H, W] weight sum (float32): probs or branches


def _nbytes(slab: _Slab) -> int:
    return sum(a.nbytes for a in (slab.acc, slab.weight) if a is not None)


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
        self._slabs = self._make_slabs()
        self._added = 0
        self.live_bytes = 0
        self.peak_bytes = 0

    def _make_slabs(self) -> list[_Slab]:
        depth, patch = self.grid.shape[0], self.grid.patch[0]
        boxes = [clip_box(s, patch, depth)[:2] for s in self.grid.starts[0]]
        cuts = sorted({c for box in boxes for c in box})
        per_row = len(self.grid.starts[1]) * len(self.grid.starts[2])
        slabs = []
        for lo, hi in itertools.pairwise(cuts):
            rows = sum(1 for b0, b1 in boxes if b0 < hi and lo < b1)
            slabs.append(_Slab(start=lo, stop=hi, remaining=rows * per_row))
        return slabs

    def add(self, origin: tuple[int, int, int], tile: np.ndarray) -> None:
        """Blend one tile's probabilities [C, P0, P1, P2] at `origin` (C: K, or 3K joined
        [probs, probs_a, probs_b] with branches)."""
        if tile.shape != (self.channels, *self.grid.patch):
            raise ValueError(f"tile shape {tile.shape} != {(self.channels, *self.grid.patch)}")
        (d0, d1, od), (h0, h1, oh), (w0, w1, ow) = (
            clip_box(o, p, n) for o, p, n in zip(origin, self.grid.patch, self.grid.shape, strict=True))
        for slab in self._slabs:
            if slab.stop <= d0 or slab.start >= d1:
                continue
            if slab.remaining <= 0:
                raise ValueError(f"tile at {origin} added twice (slab {slab.start}:{slab.stop} "
                                 "already complete)")
            if slab.acc is None:
                self._allocate(slab)
            assert slab.acc is not None
            ts = slice(od + slab.start - d0, od + slab.stop - d0)
            hs, ws = slice(oh, oh + h1 - h0), slice(ow, ow + w1 - w0)
            w = self.weights[ts, hs, ws]
            slab.acc[:, :, h0:h1, w0:w1] += tile[:, ts, hs, ws] * w
            if slab.weight is not None:
                slab.weight[:, h0:h1, w0:w1] += w
            slab.remaining -= 1
            if slab.remaining == 0:
                self._finalise(slab)
        self._added += 1

    def _allocate(self, slab: _Slab) -> None:
        _, height, width = self.grid.shape
        d = slab.stop - slab.start
        slab.acc = np.zeros((self.channels, d, height, width), dtype=self.acc_dtype)
        if self.probs is not None or self.branches:
            slab.weight = np.zeros((d, height, width), dtype=np.float32)
        self.live_bytes += _nbytes(slab)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _finalise(self, slab: _Slab) -> None:
        """Argmax (and normalise, if probabilities are kept) the slab a few slices at a time:
        a whole-slab float32 copy and int64 argmax would double the slab's memory at its peak."""
        assert slab.acc is not None
        k = self.num_classes
        for lo in range(0, slab.stop - slab.start, FINALISE_SLICES):
            hi = min(lo + FINALISE_SLICES, slab.stop - slab.start)
            out = slice(slab.start + lo, slab.start + hi)
            if self.probs is None and not self.branches:
                self.labels[out] = np.argmax(slab.acc[:, lo:hi], axis=0)
                continue
            assert slab.weight is not None
            probs = slab.acc[:k, lo:hi].astype(np.float32)
            probs /= slab.weight[lo:hi]
            if self.probs is None:  # the labels of a labels-only run, whatever QC asks
                self.labels[out] = np.argmax(slab.acc[:k, lo:hi], axis=0)
            else:
                self.labels[out] = np.argmax(probs, axis=0)
                self.probs[:, out] = probs
            if self.branches:
                self._finalise_branches(slab.acc[k:, lo:hi], probs, self.labels[out], out)
        self.live_bytes -= _nbytes(slab)
        slab.acc = slab.weight = None

    def _finalise_branches(self, branch_acc: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                           out: slice) -> None:
        """Each decoder's labels and, per fused label, the fused margin's sum and count."""
        assert self.branch_labels is not None
        k = self.num_classes
        self.branch_labels[0, out] = np.argmax(branch_acc[:k], axis=0)
        self.branch_labels[1, out] = np.argmax(branch_acc[k:], axis=0)
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
        return all(s.remaining == 0 for s in self._slabs)

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels uint8 [D, H, W] and probabilities float32 [K, D, H, W] (if kept)."""
        if not self.complete:
            missing = len(self.grid) - self._added
            raise ValueError(f"stitching incomplete: {missing} of {len(self.grid)} tiles missing")
        return self.labels, self.probs

"""Calibration and int8-gate tiles: a datalist's images pre-processed by the serving code.

int8 quantisation learns each activation's range from sample inputs, so those inputs must be
what `cmc segment` will feed the graph: the images are read and pre-processed by
`cmc_serve` itself (`nifti_io.read_nifti`, modality b resampled into a's grid when the
grids differ, then `preprocess.preprocess`, exactly as `pipeline.run_case.load_case`), not
by the MONAI transforms of training. Tiles are patch-sized crops on the non-overlapping grid
that covers each volume (zero-padded like the engine pads a short axis), drawn with a seeded
generator from the cases sorted by id, so the same datalist always gives the same tiles.

Which cases: calibration draws from the training images (labelled and unlabelled); the gate
from cases calibration never saw: the validation and test splits, or, when these hold no
pair, every fourth training case, which calibration then leaves out. Only entries holding
both modalities are used (every mode's graph is calibrated on the same tiles).

The datalist is `--calibration DATALIST` or, by default, the one the checkpoint records
(`metadata["training"]["datalist"]`, as `cmc train` was given it: absolute, or relative to
the folder `cmc train` ran in, which is tried first, then the checkpoint's own folder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import ROLES
from cmc_common.errors import CmcError
from cmc_export.errors import ExportError

# Tiles per set, and at most this many cases read per set (reading is the slow part).
CALIBRATION_TILES = 64
GATE_TILES = 64
MAX_CASES = 16
SEED = 0
# Without a validation or test pair, every HOLD_OUT-th training case is kept for the gate.
HOLD_OUT = 4


class CalibrationUnavailable(ExportError):
    """No calibration data: the reason int8 was not quantised (recorded, never fatal under
    `--precision auto`)."""


@dataclass(frozen=True)
class TileSets:
    """Calibration tiles and held-out gate tiles, {"image_a", "image_b"} [N, 1, S, S, S] each."""

    datalist: Path
    calibration: dict[str, np.ndarray]
    gate: dict[str, np.ndarray]
    calibration_cases: tuple[str, ...]  # the entries read for each set
    gate_cases: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """What cmc.json's int8 gate records about the data it was calibrated and judged on."""
        return {"datalist": str(self.datalist),
                "calibration_tiles": int(self.calibration["image_a"].shape[0]),
                "calibration_cases": list(self.calibration_cases),
                "gate_tiles": int(self.gate["image_a"].shape[0]),
                "gate_cases": list(self.gate_cases), "seed": SEED}


def find_datalist(requested: Path | None, metadata: Mapping[str, Any],
                  checkpoint: Path) -> Path:
    """The calibration datalist: `requested` (must exist: ExportError) or the checkpoint's
    own; CalibrationUnavailable saying why when the checkpoint's is not on this host."""
    if requested is not None:
        if not requested.is_file():
            raise ExportError(f"{requested}: calibration datalist does not exist")
        return requested
    recorded = (metadata.get("training") or {}).get("datalist")
    if not recorded:
        raise CalibrationUnavailable(f"{checkpoint.name} records no training datalist; pass "
                                     "--calibration DATALIST to quantise to int8")
    path = Path(str(recorded))
    for candidate in (path,) if path.is_absolute() else (path, checkpoint.parent / path):
        if candidate.is_file():
            return candidate
    raise CalibrationUnavailable(f"the training datalist {recorded} recorded in "
                                 f"{checkpoint.name} is not on this host; pass "
                                 "--calibration DATALIST to quantise to int8")


def tile_origins(shape: Sequence[int], patch: int) -> list[tuple[int, int, int]]:
    """Origins of the non-overlapping tiles covering `shape` (the last flush with the end;
    an axis shorter than the patch gets one origin centred on it, negative: padding)."""
    axes = []
    for n in shape:
        if n <= patch:
            axes.append([-((patch - n) // 2)])
        else:
            axes.append(sorted({*range(0, n - patch, patch), n - patch}))
    return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]


def crop(volume: np.ndarray, origin: Sequence[int], patch: int) -> np.ndarray:
    """The patch at `origin`, zeros outside the volume (background after normalisation)."""
    out = np.zeros((patch,) * 3, dtype=np.float32)
    src, dst = [], []
    for o, n in zip(origin, volume.shape, strict=True):
        lo, hi = max(o, 0), min(o + patch, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def prepared_pair(entry: Any, modalities: Sequence[str],
                  preprocessing: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One datalist entry's two images as `cmc segment` prepares them: {role: array}."""
    from cmc_serve.nifti_io import read_nifti
    from cmc_serve.preprocess import preprocess, resample_to_reference

    volumes = {role: read_nifti(entry.image[name]) for role, name in zip(ROLES, modalities,
                                                                          strict=True)}
    reference = volumes["a"].grid
    if not volumes["b"].grid.same_as(reference):
        volumes["b"] = resample_to_reference(volumes["b"], reference)
    return {role: preprocess(volumes[role], name, preprocessing).array
            for role, name in zip(ROLES, modalities, strict=True)}


def draw_tiles(entries: Sequence[Any], count: int, patch: int, modalities: Sequence[str],
               preprocessing: Mapping[str, Any], rng: np.random.Generator
               ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """`count` tiles (fewer if the cases hold fewer) drawn from at most MAX_CASES entries,
    and the ids of the entries read."""
    chosen = [entries[i] for i in sorted(rng.permutation(len(entries))[:MAX_CASES])]
    pool: list[tuple[dict[str, np.ndarray], tuple[int, int, int]]] = []
    for entry in chosen:
        pair = prepared_pair(entry, modalities, preprocessing)
        pool += [(pair, origin) for origin in tile_origins(pair["a"].shape, patch)]
    picks = sorted(rng.permutation(len(pool))[:count])
    tiles = {f"image_{role}": np.stack([crop(pool[i][0][role], pool[i][1], patch)[None]
                                        for i in picks])
             for role in ROLES}
    return tiles, tuple(e.id for e in chosen)


def split_cases(datalist: Any) -> tuple[list[Any], list[Any]]:
    """(calibration entries, gate entries): disjoint, both holding both modalities."""
    def paired(entries: Sequence[Any]) -> list[Any]:
        return sorted((e for e in entries if set(datalist.modalities) <= set(e.image)),
                      key=lambda e: e.id)

    training = paired(datalist.labelled + datalist.unlabelled)
    held_out = paired(datalist.validation + datalist.test)
    if not held_out:
        held_out = training[HOLD_OUT - 1::HOLD_OUT]
        training = [e for e in training if e not in held_out]
    return training, held_out


def tile_sets(datalist_path: Path, modalities: Sequence[str], preprocessing: Mapping[str, Any],
              patch: int, calibration_tiles: int = CALIBRATION_TILES,
              gate_tiles: int = GATE_TILES) -> TileSets:
    """Calibration and gate tiles from the datalist (module docstring); CalibrationUnavailable
    when it cannot give both, the DatalistError as raised when it is invalid."""
    from cmc_train.data.datalist import Datalist

    datalist = Datalist.load(datalist_path)
    if list(datalist.modalities) != list(modalities):
        raise CalibrationUnavailable(f"{datalist_path}: modalities {list(datalist.modalities)} "
                                     f"differ from the model's {list(modalities)}")
    training, held_out = split_cases(datalist)
    if not training or not held_out:
        raise CalibrationUnavailable(f"{datalist_path}: int8 needs cases holding both "
                                     f"modalities to calibrate on and others to gate on; "
                                     f"found {len(training)} and {len(held_out)}")
    rng = np.random.default_rng(SEED)
    try:
        calibration, calibration_ids = draw_tiles(training, calibration_tiles, patch,
                                                  modalities, preprocessing, rng)
        gate, gate_ids = draw_tiles(held_out, gate_tiles, patch, modalities, preprocessing, rng)
    except CmcError:  # the reader's or pre-processing's own refusal names its file
        raise
    except (OSError, ValueError) as exc:
        raise CalibrationUnavailable(f"{datalist_path}: {exc}") from exc
    return TileSets(datalist_path, calibration, gate, calibration_ids, gate_ids)

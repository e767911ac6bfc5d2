"""Datalists for public two-modality datasets, from their published file layouts.

AMOS 2022 (https://amos22.grand-challenge.org, zenodo 7262581):
    ROOT/dataset.json               "labels": {"0": "background", "1": "spleen", ...}
    ROOT/imagesTr/amos_XXXX.nii.gz  ROOT/labelsTr/amos_XXXX.nii.gz
    ROOT/imagesVa/...               ROOT/labelsVa/...
    ROOT/imagesTs/...               (ROOT/labelsTs/... where released)
  Ids 0001-0500 are CT, ids above 500 are MRI (the AMOS convention). CT and MRI come from
  different patients, so every entry carries one modality ("ct" or "mr"). Official
  validation cases (imagesVa + labelsVa) form the validation split; labelled test cases
  (imagesTs + labelsTs) the test split.

MS-CMRSeg 2019 (https://zmiclab.github.io/zxh/0/mscmrseg19/):
    patientN_C0.nii.gz (bSSFP), patientN_LGE.nii.gz, patientN_T2.nii.gz and manual labels
    patientN_C0_manual.nii.gz, patientN_LGE_manual.nii.gz, patientN_T2_manual.nii.gz,
  in whatever folders (the release uses c0t2lge/, c0gt/, lgegt/, t2gt/): files are found by
  name anywhere under ROOT. Sequences of one patient share an entry (unregistered).
  Label values 500 (LV blood pool), 600 (RV blood pool), 200 (LV myocardium) are remapped
  to 1, 2, 3 (classes background, lv, rv, myo); other values (e.g. scar 2221, edema 1220 in
  later releases) become background. Remapped labels are written as uint8 NIfTI files
  (same affine and header geometry) into `labels_remapped/` next to the datalist.

Both: training entries are split into labelled / unlabelled with `labelled_ratio` (at least
one labelled entry per modality group, chosen with the seed); unlabelled entries drop their
labels. Where the dataset has no official validation split, `val_fraction` of the labelled
training entries (at least one) become validation.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from cmc_common.errors import CmcError
from cmc_train.data.datalist import Datalist, Entry
from cmc_train.errors import ConfigError

AMOS_MODALITIES: tuple[str, str] = ("ct", "mr")
AMOS_MAX_CT_ID = 500
MSCMR_SEQUENCES = {"bssfp": "C0", "lge": "LGE", "t2": "T2"}
MSCMR_LABEL_MAP = {500: 1, 600: 2, 200: 3}
MSCMR_CLASSES = ("background", "lv", "rv", "myo")


class DatasetLayoutError(CmcError, ValueError):
    """A dataset folder that does not match the expected public layout."""


@dataclass(frozen=True)
class SplitOptions:
    """How the training entries are divided."""

    labelled_ratio: float = 0.1
    seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.labelled_ratio <= 1.0:
            raise ConfigError(f"labelled ratio must be in (0, 1], got {self.labelled_ratio}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"validation fraction must be in [0, 1), got {self.val_fraction}")


def _group_key(entry: Entry) -> tuple[str, ...]:
    return tuple(sorted(entry.image))


def split_training(entries: list[Entry], options: SplitOptions,
                   need_validation: bool) -> tuple[list[Entry], list[Entry], list[Entry]]:
    """(labelled, unlabelled, validation) from training entries, per modality group.

    Entries are grouped by the modalities they carry (AMOS: CT-only vs MRI-only), so each
    modality gets its share of labels. Validation takes entries labelled for every image
    they carry (`val_fraction` of the group, at least one, never the last labelled one);
    labelled entries are drawn from those with any label; everything else is unlabelled
    and loses its labels.
    """
    rng = np.random.default_rng(options.seed)
    groups: dict[tuple[str, ...], list[Entry]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: e.id):
        groups[_group_key(entry)].append(entry)
    labelled: list[Entry] = []
    unlabelled: list[Entry] = []
    validation: list[Entry] = []
    for key in sorted(groups):
        group = groups[key]
        complete = [e for e in group if e.label and set(e.label) == set(e.image)]
        complete = [complete[i] for i in rng.permutation(len(complete))]
        n_val = 0
        if need_validation and options.val_fraction > 0:
            spare = sum(1 for e in group if e.label) - 1
            n_val = min(spare, len(complete),
                        max(1, math.floor(options.val_fraction * len(group))))
        held_out = {e.id for e in complete[:n_val]}
        validation += complete[:n_val]
        train = [e for e in group if e.id not in held_out]
        candidates = [e for e in train if e.label]
        candidates = [candidates[i] for i in rng.permutation(len(candidates))]
        n_lab = min(len(candidates), max(1, round(options.labelled_ratio * len(train))))
        chosen = {e.id for e in candidates[:n_lab]}
        for e in train:
            if e.id in chosen:
                labelled.append(e)
            else:
                unlabelled.append(replace(e, label={}))
    return labelled, unlabelled, validation


# ----------------------------------------------------------------------------- AMOS 2022

_AMOS_NAME = re.compile(r"^amos_(\d+)\.nii(\.gz)?$")


def amos_modality(case_number: int) -> str:
    """'ct' for AMOS ids up to 500, 'mr' above (the dataset's numbering)."""
    return "ct" if case_number <= AMOS_MAX_CT_ID else "mr"


def _amos_classes(root: Path) -> tuple[str, ...]:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
        labels = meta["labels"]
        values = sorted(labels.items(), key=lambda kv: int(kv[0]))
    except (OSError, json.JSONDecodeError, KeyError, ValueError, AttributeError) as exc:
        raise DatasetLayoutError(f"{path}: cannot read AMOS class names ('labels') ({exc})") from exc
    if [int(k) for k, _ in values] != list(range(len(values))):
        raise DatasetLayoutError(f"{path}: 'labels' values must be 0..K-1, got {[k for k, _ in values]}")
    return tuple(str(v) for _, v in values)


def _amos_folder(root: Path, images: str, labels: str,
                 require_labels: bool) -> list[Entry]:
    folder = root / images
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        match = _AMOS_NAME.match(path.name)
        if not match:
            continue
        modality = amos_modality(int(match.group(1)))
        label = root / labels / path.name
        if require_labels and not label.is_file():
            continue
        entries.append(Entry(id=path.name.split(".")[0], image={modality: path},
                             label={modality: label} if label.is_file() else {}))
    return entries


def import_amos(root: Path | str, options: SplitOptions) -> Datalist:
    """Datalist of an AMOS 2022 folder (see the module docstring for the layout)."""
    root = Path(root)
    if not (root / "imagesTr").is_dir():
        raise DatasetLayoutError(f"{root}: not an AMOS 2022 folder (no imagesTr/)")
    classes = _amos_classes(root)
    training = _amos_folder(root, "imagesTr", "labelsTr", require_labels=False)
    if not training:
        raise DatasetLayoutError(f"{root / 'imagesTr'}: no amos_XXXX.nii.gz images")
    validation = _amos_folder(root, "imagesVa", "labelsVa", require_labels=True)
    labelled, unlabelled, carved = split_training(training, options,
                                                  need_validation=not validation)
    test = _amos_folder(root, "imagesTs", "labelsTs", require_labels=True)
    return Datalist(modalities=AMOS_MODALITIES, classes=classes, labelled=tuple(labelled),
                    unlabelled=tuple(unlabelled), validation=tuple(validation or carved),
                    test=tuple(test))


# ------------------------------------------------------------------------- MS-CMRSeg 2019

_MSCMR_NAME = re.compile(r"^patient(\d+)_(C0|LGE|T2)(_manual)?\.nii(\.gz)?$")


def remap_mscmr_label(source: Path, target: Path) -> Path:
    """Write `source` with 500/600/200 -> 1/2/3 (everything else 0) as uint8 NIfTI."""
    image = cast(nib.Nifti1Image, nib.load(source))
    values = np.asarray(image.dataobj)
    out = np.zeros(values.shape, dtype=np.uint8)
    for value, cls in MSCMR_LABEL_MAP.items():
        out[np.rint(values) == value] = cls
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, image.affine, header), target)
    return target


def import_mscmr(root: Path | str, options: SplitOptions, modalities: tuple[str, str],
                 out_dir: Path | str) -> Datalist:
    """Datalist of an MS-CMRSeg 2019 folder for two sequences (bssfp, lge, t2).

    Remapped label files are written under `out_dir/labels_remapped/`.
    """
    root, out_dir = Path(root), Path(out_dir)
    unknown = [m for m in modalities if m not in MSCMR_SEQUENCES]
    if unknown or len(set(modalities)) != 2:
        raise ConfigError(f"choose two distinct MS-CMRSeg sequences of {sorted(MSCMR_SEQUENCES)}, "
                          f"got {list(modalities)}")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a folder")
    sequence_to_modality = {MSCMR_SEQUENCES[m]: m for m in modalities}
    images: dict[str, dict[str, Path]] = defaultdict(dict)
    labels: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(root.rglob("patient*.nii*")):
        match = _MSCMR_NAME.match(path.name)
        if not match or match.group(2) not in sequence_to_modality:
            continue
        case_id = f"patient{int(match.group(1))}"
        modality = sequence_to_modality[match.group(2)]
        target = labels if match.group(3) else images
        if modality in target[case_id]:
            raise DatasetLayoutError(f"{root}: two files for {case_id} {modality}: "
                               f"{target[case_id][modality]} and {path}")
        target[case_id][modality] = path
    if not images:
        raise DatasetLayoutError(f"{root}: no patientN_{{C0,LGE,T2}}.nii.gz images of "
                           f"{list(modalities)}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetLayoutError(f"{root}: labels without images for {orphans}")
    entries = []
    for case_id in sorted(images, key=lambda c: int(c.removeprefix("patient"))):
        remapped = {m: remap_mscmr_label(p, out_dir / "labels_remapped" / f"{case_id}_{m}.nii.gz")
                    for m, p in labels[case_id].items() if m in images[case_id]}
        entries.append(Entry(id=case_id, image=dict(images[case_id]), label=remapped))
    labelled, unlabelled, validation = split_training(entries, options, need_validation=True)
    return Datalist(modalities=modalities, classes=MSCMR_CLASSES, labelled=tuple(labelled),
                    unlabelled=tuple(unlabelled), validation=tuple(validation))

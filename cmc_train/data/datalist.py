"""The datalist: which volumes exist, of which modality, labelled or not, in which split.

One JSON file, paths relative to its own folder, so that a data folder can be moved or
copied as a whole:

    {"modalities": ["ct", "mr"], "classes": ["background", ...],
     "labelled": [...], "unlabelled": [...], "validation": [...], "test": [...],
     "calibration": [...]}                                         # optional

each entry `{"id": str, "image": {"ct": path, "mr": path}, "label": {"ct": path, ...}}`.
An entry may carry one modality only (AMOS: CT and MRI of different patients). Labels
appear only where a volume is labelled: unlabelled entries carry none (so that nothing
downstream can peek at them), validation and test entries carry one per image.

`calibration` (optional, labels optional): held-out cases neither trained on nor used to
choose the checkpoint, on which `cmc train` calibrates quality control
(`cmc_train.qc_reference`). Four validation cases that also chose the checkpoint give
coarse and optimistic floors; twenty or more volumes set aside give floors a case of the
same distribution rarely crosses. Labels, where given, set the fused answer's held-out
mean Dice (the measure a failed case is judged by) on cases that did not choose the
checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmc_common.errors import CmcError

SPLITS: tuple[str, ...] = ("labelled", "unlabelled", "validation", "test", "calibration")
OPTIONAL_SPLITS: tuple[str, ...] = ("calibration",)  # absent from a datalist: empty


class DatalistError(CmcError, ValueError):
    """A datalist file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Entry:
    """One case: an image per available modality and a label per labelled modality."""

    id: str
    image: dict[str, Path]
    label: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Datalist:
    """A validated datalist with absolute paths."""

    modalities: tuple[str, str]
    classes: tuple[str, ...]
    labelled: tuple[Entry, ...] = ()
    unlabelled: tuple[Entry, ...] = ()
    validation: tuple[Entry, ...] = ()
    test: tuple[Entry, ...] = ()
    calibration: tuple[Entry, ...] = ()

    def split(self, name: str) -> tuple[Entry, ...]:
        """The entries of split `name` (one of SPLITS)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {list(SPLITS)}")
        entries: tuple[Entry, ...] = getattr(self, name)
        return entries

    @classmethod
    def load(cls, path: Path | str) -> Datalist:
        """Read and validate `path`; relative paths resolve against its folder.

        Raises DatalistError on unreadable JSON, missing keys, unknown modalities,
        duplicate ids, labels where none may be, or files that do not exist.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatalistError(f"{path}: cannot read datalist ({exc})") from exc
        return _parse(data, path)

    def save(self, path: Path | str) -> None:
        """Write as JSON with paths relative to the file's folder."""
        path = Path(path)
        root = path.resolve().parent

        def rel(p: Path) -> str:
            return Path(os.path.relpath(Path(p).resolve(), root)).as_posix()

        def encode(e: Entry) -> dict[str, Any]:
            return {"id": e.id, "image": {m: rel(p) for m, p in e.image.items()},
                    "label": {m: rel(p) for m, p in e.label.items()}}

        data: dict[str, Any] = {"modalities": list(self.modalities), "classes": list(self.classes)}
        for split in SPLITS:
            if self.split(split) or split not in OPTIONAL_SPLITS:
                data[split] = [encode(e) for e in self.split(split)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


def _parse(data: Any, path: Path) -> Datalist:
    def fail(problem: str) -> DatalistError:
        return DatalistError(f"{path}: {problem}")

    if not isinstance(data, dict):
        raise fail("top level must be a JSON object")
    missing = [k for k in ("modalities", "classes", *SPLITS)
               if k not in data and k not in OPTIONAL_SPLITS]
    if missing:
        raise fail(f"missing keys {missing}")
    modalities = data["modalities"]
    if (not isinstance(modalities, list) or len(modalities) != 2
            or not all(isinstance(m, str) and m for m in modalities)
            or modalities[0] == modalities[1]):
        raise fail(f"'modalities' must list two distinct names, got {modalities!r}")
    classes = data["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(
            isinstance(c, str) for c in classes):
        raise fail(f"'classes' must list >= 2 names (background first), got {classes!r}")
    root = path.resolve().parent
    seen: set[str] = set()
    splits: dict[str, tuple[Entry, ...]] = {}
    for split in SPLITS:
        raw_entries = data.get(split, [])
        if not isinstance(raw_entries, list):
            raise fail(f"'{split}' must be a list of entries")
        entries = []
        for i, raw in enumerate(raw_entries):
            entry = _parse_entry(raw, f"{split}[{i}]", modalities, root, fail)
            if entry.id in seen:
                raise fail(f"duplicate id {entry.id!r} in {split}[{i}]")
            seen.add(entry.id)
            _check_labels(entry, split, fail)
            entries.append(entry)
        splits[split] = tuple(entries)
    return Datalist(modalities=(modalities[0], modalities[1]), classes=tuple(classes), **splits)


def _parse_entry(raw: Any, where: str, modalities: list[str], root: Path,
                 fail: Callable[[str], DatalistError]) -> Entry:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise fail(f"{where}: an entry needs a non-empty string 'id'")
    name = f"{where} ({raw['id']})"
    files: dict[str, dict[str, Path]] = {}
    for kind in ("image", "label"):
        mapping = raw.get(kind, {})
        if not isinstance(mapping, dict):
            raise fail(f"{name}: '{kind}' must map modality names to paths")
        resolved = {}
        for modality, rel in mapping.items():
            if modality not in modalities:
                raise fail(f"{name}: unknown modality {modality!r} in '{kind}' "
                           f"(datalist modalities: {modalities})")
            if not isinstance(rel, str) or not rel:
                raise fail(f"{name}: {kind} path for {modality} must be a non-empty string")
            full = (root / rel).resolve()
            if not full.is_file():
                raise fail(f"{name}: {kind} file for {modality} does not exist: {full}")
            resolved[modality] = full
        files[kind] = resolved
    if not files["image"]:
        raise fail(f"{name}: no image")
    stray = sorted(set(files["label"]) - set(files["image"]))
    if stray:
        raise fail(f"{name}: label without image for {stray}")
    return Entry(id=raw["id"], image=files["image"], label=files["label"])


def _check_labels(entry: Entry, split: str, fail: Callable[[str], DatalistError]) -> None:
    """Unlabelled entries carry no label; labelled ones some; evaluation splits all;
    calibration entries any."""
    if split == "unlabelled" and entry.label:
        raise fail(f"unlabelled entry {entry.id!r} carries labels {sorted(entry.label)}")
    if split == "labelled" and not entry.label:
        raise fail(f"labelled entry {entry.id!r} has no label")
    if split in ("validation", "test"):
        unlabelled = sorted(set(entry.image) - set(entry.label))
        if unlabelled:
            raise fail(f"{split} entry {entry.id!r} has no label for {unlabelled}")

"""From the command line's `INPUT [INPUT_B]` to a list of cases.

A case is one patient study to segment: up to two images (modality a and b). Accepted inputs:
- a NIfTI file (INPUT_B: an optional second NIfTI file or DICOM folder);
- a DICOM series folder, or any folder tree of DICOM files (many studies: batch). Series are
  grouped by StudyInstanceUID, one case per study; which series is a and which is b is
  decided later by `pairing` when the case runs, so one ambiguous study fails alone;
- a folder of NIfTI files: `<case>_0000.nii.gz` / `<case>_0001.nii.gz` (nnU-Net's channel
  suffixes) are modality a / b of one case, any other file is a single-modality case.

Case ids are deterministic and safe as folder names: for DICOM, PatientID and a hash of the
StudyInstanceUID (two studies of one patient stay apart, no raw UID in paths); for NIfTI,
the file's path relative to INPUT without its suffix. `--shard I/N` keeps every N-th case of
the id-sorted list, so N machines given the same input cover every case exactly once.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmc_serve.errors import SegmentError
from cmc_serve.nifti_io import NIFTI_SUFFIXES, is_nifti_path
from cmc_serve.pipeline.pairing import SeriesSummary

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>000[01])$")


class CaseDiscoveryError(SegmentError, ValueError):
    """INPUT holds nothing that can be segmented, or the inputs do not fit together."""


@dataclass(frozen=True)
class Source:
    """One image of a case: a NIfTI file or a DICOM series.

    `role` is "a"/"b" when the user fixed it (positional INPUT/INPUT_B, nnU-Net channel
    suffix); None when pairing rules decide from the DICOM tags.
    """

    kind: str  # "nifti" | "dicom"
    path: Path
    role: str | None = None
    series: Any = None  # cmc_serve.dicom.scan.SeriesInfo for DICOM sources
    summary: SeriesSummary | None = None

    def describe(self) -> str:
        if self.summary is not None:
            return f"{self.summary.label()} in {self.path}"
        return str(self.path)


@dataclass(frozen=True)
class Case:
    """One study to segment; `sources` are its candidate images."""

    case_id: str
    sources: tuple[Source, ...]
    origin: Path
    notes: tuple[str, ...] = ()  # series found but not usable (localizers, derived ...)

    @property
    def is_dicom(self) -> bool:
        return any(s.kind == "dicom" for s in self.sources)


def sanitise(text: str, limit: int = 64) -> str:
    """A folder-name-safe version of `text` (letters, digits, '.', '_', '-')."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return clean[:limit] or "case"


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ------------------------------------------------------------------------------- DICOM

def _scan_dicom(folder: Path) -> tuple[list[Any], list[Any]]:
    """(volume series, other image series) under `folder`; SEG/SR/... objects are ignored.
    A folder that cannot be scanned raises the scanner's `DicomScanError`."""
    from cmc_serve.dicom.scan import NON_IMAGE, VOLUME, scan_folder

    result = scan_folder(folder)
    others = [s for s in result.series if s.kind not in (VOLUME, NON_IMAGE)]
    return result.volumes, others


def summarise(info: Any) -> SeriesSummary:
    """The pairing view of a scanned series."""
    return SeriesSummary(uid=info.uid, modality=info.modality, description=info.description,
                         number=info.series_number, num_slices=info.n_slices)


def study_case_id(patient_id: str, study_uid: str) -> str:
    """The case id of a DICOM study: PatientID plus a hash of the StudyInstanceUID (stable,
    unique, no raw UID in paths); also how `dicomweb` finds a study's case before retrieval."""
    digest = hashlib.sha1(study_uid.encode()).hexdigest()[:8]
    return f"{sanitise(patient_id or 'anonymous', 40)}_{digest}"


def _dicom_sources(series: Sequence[Any], role: str | None) -> tuple[Source, ...]:
    return tuple(Source("dicom", info.folder, role, info, summarise(info)) for info in series)


def _dicom_cases(volumes: Sequence[Any], others: Sequence[Any], root: Path) -> list[Case]:
    """One case per study that holds an image series; a study without any volume series
    becomes a case that fails with the reasons its series were skipped."""
    by_study: dict[str, list[Any]] = defaultdict(list)
    notes: dict[str, list[str]] = defaultdict(list)
    first: dict[str, Any] = {}
    for info in volumes:
        by_study[info.study_uid].append(info)
        first.setdefault(info.study_uid, info)
    for info in others:
        notes[info.study_uid].append(f"skipped {info.summary()}")
        first.setdefault(info.study_uid, info)
    return [Case(study_case_id(info.patient_id, info.study_uid), _dicom_sources(by_study[uid], None), root,
                 tuple(notes[uid]))
            for uid, info in first.items()]


# ------------------------------------------------------------------------------- NIfTI

def _nifti_cases(files: Sequence[Path], root: Path, single_role: str) -> list[Case]:
    groups: dict[str, list[Source]] = defaultdict(list)
    for f in files:
        rel = (f.relative_to(root).parent / _nifti_stem(f)).as_posix()
        m = _NNUNET_CHANNEL.match(rel)
        if m:
            role = "a" if m["channel"] == "0000" else "b"
            groups[m["case"]].append(Source("nifti", f, role))
        else:
            groups[rel].append(Source("nifti", f, single_role))
    return [Case(sanitise(name.replace("/", "_"), 96), tuple(srcs), root)
            for name, srcs in groups.items()]


# ------------------------------------------------------------------------------- entry

def _single_source(path: Path, role: str) -> tuple[Source, ...]:
    """INPUT or INPUT_B given with INPUT_B: one image (file, or the series of a folder)."""
    if path.is_file():
        if not is_nifti_path(path):
            raise CaseDiscoveryError(f"{path}: not a NIfTI file (.nii/.nii.gz); give a DICOM "
                                     "series as its folder")
        return (Source("nifti", path, role),)
    series, others = _scan_dicom(path)
    if not series:
        skipped = "; ".join(s.summary() for s in others) or "none"
        raise CaseDiscoveryError(f"{path}: no DICOM volume series (skipped: {skipped})")
    studies = {info.study_uid for info in series}
    if len(studies) > 1:
        raise CaseDiscoveryError(f"{path}: holds {len(studies)} studies; with two inputs each "
                                 "must be one study (or give one folder for a batch)")
    return _dicom_sources(series, role)


def discover_cases(input_path: Path, input_b: Path | None = None,
                   single_role: str = "a") -> list[Case]:
    """All cases in INPUT (and INPUT_B), sorted by case id; ids are unique.

    `single_role` is the role of a lone NIfTI image ("b" under `--mode b`).
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise CaseDiscoveryError(f"{input_path}: no such file or folder")
    if input_b is not None:
        input_b = Path(input_b)
        if not input_b.exists():
            raise CaseDiscoveryError(f"{input_b}: no such file or folder")
        sources = _single_source(input_path, "a") + _single_source(input_b, "b")
        first = sources[0]
        name = (study_case_id(first.series.patient_id, first.series.study_uid)
                if first.kind == "dicom"
                else sanitise(_nifti_stem(first.path)))
        return [Case(name, sources, input_path)]
    if input_path.is_file():
        if not is_nifti_path(input_path):
            raise CaseDiscoveryError(f"{input_path}: not a NIfTI file (.nii/.nii.gz) or a "
                                     "folder of DICOM files")
        return [Case(sanitise(_nifti_stem(input_path)),
                     (Source("nifti", input_path, single_role),), input_path.parent)]
    if not input_path.is_dir():
        raise CaseDiscoveryError(f"{input_path}: neither a file nor a folder")
    files = [p for p in input_path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise CaseDiscoveryError(f"{input_path}: folder is empty")
    nifti = sorted(p for p in files if is_nifti_path(p))
    cases = _nifti_cases(nifti, input_path, single_role)
    if len(nifti) < len(files):
        from cmc_serve.dicom.errors import DicomScanError

        try:
            cases += _dicom_cases(*_scan_dicom(input_path), input_path)
        except (CaseDiscoveryError, DicomScanError):
            if not cases:
                raise
    if not cases:
        raise CaseDiscoveryError(f"{input_path}: no NIfTI files or DICOM image series among "
                                 f"its {len(files)} files")
    return _unique(sorted(cases, key=_sort_key))


def _sort_key(case: Case) -> tuple[str, str]:
    if not case.sources:
        return case.case_id, ""
    first = case.sources[0]
    return case.case_id, first.summary.uid if first.summary else str(first.path)


# Names of run-level files in OUT that a case folder must never take.
RESERVED_IDS = frozenset({"report.json", "failures.csv"})


def _unique(cases: list[Case]) -> list[Case]:
    """Suffix repeated (or reserved) ids with -2, -3 ... (stable: the list is sorted)."""
    seen: dict[str, int] = {name: 1 for name in RESERVED_IDS}
    out = []
    for c in cases:
        n = seen.get(c.case_id, 0) + 1
        seen[c.case_id] = n
        out.append(c if n == 1 else Case(f"{c.case_id}-{n}", c.sources, c.origin, c.notes))
    return out


# ------------------------------------------------------------------------------- shards

def shard_of(keys: Sequence[str], index: int, count: int) -> list[str]:
    """The one shard rule: share `index` (1-based) of `count`, every `count`-th of the sorted
    keys (case ids for inputs, study UIDs for `dicomweb`), so N machines given the same
    input cover every key exactly once."""
    return sorted(keys)[index - 1::count]


def select_shard(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """The cases of share `index` of `count` by their ids (`shard_of`), in id order."""
    kept = set(shard_of([c.case_id for c in cases], index, count))
    return sorted((c for c in cases if c.case_id in kept), key=lambda c: c.case_id)

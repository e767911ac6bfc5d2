"""Find the DICOM series in a folder tree and say which of them can be segmented.

Real exports mix several series in one folder: scouts/localizers, derived reformats, SEG or SR
objects, DICOMDIR indexes and stray non-DICOM files. We read headers only
(`stop_before_pixels`), group by SeriesInstanceUID, and classify each series; nothing is
silently dropped: unreadable files and every skipped series carry a reason the CLI can show.

A file that looks like part of a series but cannot be read (a truncated or empty slice) is
attributed to that series (`SeriesInfo.unreadable`), so that loading it fails by naming the
file instead of giving a volume one slice short (the first or last slice) or speaking of a
"missing slice". A file looks like part of a series when it lies in the same folder as the
series' files and either is DICOM whose header is damaged (the DICM preamble, but a header
that fails to parse, lacks SeriesInstanceUID, or ends before the pixel data) or carries a
name of the same pattern as theirs (digits aside: IM0011.dcm beside IM0000.dcm), such as an
empty file. Other files (notes, PDFs, hidden resource forks, DICOMDIR) are skipped as before.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from cmc_serve.dicom.errors import DicomScanError
from cmc_serve.dicom.multiframe import frame_value

log = logging.getLogger(__name__)

# Objects that are DICOM but not images we can segment.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "PR",
                                  "KO", "REG", "DOC", "RWV", "FID", "PLAN"})
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# DCM 113040 "Lossy Compression": an image DERIVED only by this (dcmtk and PACS archives mark
# lossy-compressed originals so) is still the acquisition, not a reformat or a map.
LOSSY_COMPRESSION_CODE = ("113040", "DCM")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# How a skipped file relates to the series beside it (see the module docstring).
DAMAGED, SAME_NAME, UNRELATED = "damaged", "same-name", "unrelated"

# Series kinds; only VOLUME series are candidates by default.
VOLUME, LOCALIZER, DERIVED, NON_IMAGE, UNSUPPORTED = (
    "volume", "localizer", "derived", "non-image", "unsupported")


@dataclass(frozen=True)
class SeriesInfo:
    """One series found on disk, with why it is (not) a candidate for segmentation."""

    uid: str
    study_uid: str
    modality: str
    description: str
    paths: tuple[Path, ...]
    patient_id: str
    study_id: str
    series_number: int | None
    plane: str  # axial | coronal | sagittal | mixed | none
    kind: str
    reason: str  # why this kind, e.g. "ImageType contains LOCALIZER"
    issuer_of_patient_id: str = ""
    frame_of_reference_uid: str = ""
    # files beside the series that look like part of it but cannot be read: (path, why)
    unreadable: tuple[tuple[Path, str], ...] = ()
    n_frames: int = 0  # frames in all files (Enhanced multi-frame); 0: one per file

    @property
    def n_files(self) -> int:
        return len(self.paths)

    @property
    def n_slices(self) -> int:
        """Images in the series: the frames of multi-frame files, else one per file."""
        return self.n_frames or self.n_files

    @property
    def folder(self) -> Path:
        """The deepest folder holding all of the series' files (for error messages)."""
        return Path(os.path.commonpath([str(p.parent) for p in self.paths]))

    def summary(self) -> str:
        frames = f", {self.n_frames} frames" if self.n_frames else ""
        return (f"{self.uid} ({self.modality} '{self.description}', {self.n_files} files{frames}, "
                f"{self.kind}: {self.reason})")


@dataclass
class ScanResult:
    """All series found under a folder plus the files that are not usable DICOM."""

    folder: Path
    series: list[SeriesInfo] = field(default_factory=list)
    skipped_files: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def volumes(self) -> list[SeriesInfo]:
        return [s for s in self.series if s.kind == VOLUME]


@dataclass(frozen=True)
class _Header:
    """The few header fields classification needs, parsed once per file."""

    path: Path
    series_uid: str
    study_uid: str
    modality: str
    description: str
    patient_id: str
    issuer_of_patient_id: str
    frame_of_reference_uid: str
    study_id: str
    series_number: int | None
    image_type: tuple[str, ...]
    sop_class: str
    has_image: bool
    frames: int
    enhanced: bool  # has per-frame functional groups (Enhanced / Legacy Converted Enhanced)
    orientation: tuple[float, ...] | None
    echo_time: str  # "" when absent
    lossy_copy: bool  # derived from an original by lossy compression only


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:  # Enhanced: in the functional groups (the first frame's, or shared)
        iop = frame_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    try:
        values = tuple(float(v) for v in iop) if iop is not None else None
    except (TypeError, ValueError):
        return None
    return values if values is not None and len(values) == 6 else None


def _lossy_copy(ds: Dataset) -> bool:
    """Whether every derivation code says "Lossy Compression" (and there is one)."""
    codes = ds.get("DerivationCodeSequence") or []
    return bool(codes) and all(
        (str(c.get("CodeValue", "")), str(c.get("CodingSchemeDesignator", "")))
        == LOSSY_COMPRESSION_CODE for c in codes)


@dataclass(frozen=True)
class _Skip:
    """A file that is not a usable instance: why, and how it relates to series beside it."""

    path: Path
    reason: str
    relation: str  # DAMAGED | SAME_NAME (part of a series if named like one) | UNRELATED


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> _Header | _Skip:
    """The header of one file, or why it is skipped."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return _Skip(path, "empty file (0 bytes)", SAME_NAME)
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=False)
            # stop_before_pixels leaves the file at the pixel data; at the end of the file
            # an image header was cut short (or it has no pixel data at all). A deflated
            # dataset is read whole and inflated in memory: its position says nothing.
            ends_early = (f.tell() >= size and ds.file_meta.get("TransferSyntaxUID")
                          != DeflatedExplicitVRLittleEndian)
    except InvalidDicomError:
        return _Skip(path, "not a DICOM file (no DICM preamble)", SAME_NAME)
    except Exception as exc:  # pydicom raises many types on corrupt headers
        return _Skip(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})",
                     DAMAGED if _has_preamble(path) else SAME_NAME)
    try:
        sop_class = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            return _Skip(path, "DICOMDIR index, not an instance", UNRELATED)
        series_uid = _text(ds, "SeriesInstanceUID")
        if not series_uid:
            return _Skip(path, "DICOM without SeriesInstanceUID (incomplete or truncated "
                               "header)", DAMAGED)
        modality = _text(ds, "Modality").upper()
        if ends_early and modality not in NON_IMAGE_MODALITIES:
            return _Skip(path, "no pixel data: the file ends after its header (truncated?)",
                         DAMAGED)
        number = ds.get("SeriesNumber")
        image_type = ds.get("ImageType") or ()
        image_type = (image_type,) if isinstance(image_type, str) else image_type
        return _Header(
            path=path, series_uid=series_uid, study_uid=_text(ds, "StudyInstanceUID"),
            modality=modality, description=_text(ds, "SeriesDescription"),
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"), study_id=_text(ds, "StudyID"),
            series_number=int(number) if number not in (None, "") else None,
            image_type=tuple(str(t).strip().upper() for t in image_type),
            sop_class=sop_class, has_image="Rows" in ds and "Columns" in ds,
            frames=int(ds.get("NumberOfFrames") or 1),
            enhanced="PerFrameFunctionalGroupsSequence" in ds, orientation=_orientation(ds),
            echo_time=f"{float(ds.EchoTime):g}" if ds.get("EchoTime") not in (None, "") else "",
            lossy_copy=_lossy_copy(ds))
    except Exception as exc:  # garbled values (wrong VR, bad numbers) surface on access
        return _Skip(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})", DAMAGED)


def _name_pattern(name: str) -> str:
    """A file name with its digits masked: slices of one series share it."""
    return re.sub(r"\d+", "#", name.lower())


def _unreadable_members(headers: list[_Header], skipped: list[_Skip]
                        ) -> tuple[tuple[Path, str], ...]:
    """The skipped files that look like part of the series of `headers`."""
    folders = {h.path.parent for h in headers}
    patterns = {_name_pattern(h.path.name) for h in headers}
    return tuple((s.path, s.reason) for s in skipped
                 if s.path.parent in folders and not s.path.name.startswith(".")
                 and (s.relation == DAMAGED
                      or (s.relation == SAME_NAME and _name_pattern(s.path.name) in patterns)))


def _plane(orientations: list[tuple[float, ...]]) -> str:
    if not orientations:
        return "none"
    names = set()
    for iop in orientations:
        normal = np.cross(iop[:3], iop[3:])
        names.add(("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))])
    return names.pop() if len(names) == 1 else "mixed"


def _distinct_orientations(orientations: list[tuple[float, ...]]) -> int:
    distinct: list[np.ndarray] = []
    for iop in orientations:
        v = np.asarray(iop)
        if not any(np.allclose(v, d, atol=1e-3) for d in distinct):
            distinct.append(v)
    return len(distinct)


def _classify(headers: list[_Header]) -> tuple[str, str]:
    """(kind, reason) of one series from its headers."""
    first = headers[0]
    if first.modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE, f"modality {first.modality} is not an image"
    if not all(h.has_image for h in headers):
        return NON_IMAGE, "no Rows/Columns: not an image object"
    if first.sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return DERIVED, "secondary capture"
    image_type = {t for h in headers for t in h.image_type}
    if image_type & {"LOCALIZER", "SCOUT"}:
        return LOCALIZER, "ImageType contains LOCALIZER"
    derived = first.image_type[:1] == ("DERIVED",) and not all(h.lossy_copy for h in headers)
    if derived or first.image_type[1:2] == ("SECONDARY",):
        return DERIVED, f"ImageType {'/'.join(first.image_type)}"
    if any(h.frames > 1 and not h.enhanced for h in headers):
        return UNSUPPORTED, ("multi-frame images without per-frame functional groups (cine "
                             "or a private multi-frame format) are not supported")
    echoes = sorted({h.echo_time for h in headers if h.echo_time}, key=float)
    if len(echoes) > 1:
        return UNSUPPORTED, (f"{len(echoes)} echoes in one series (EchoTime "
                             f"{', '.join(echoes)} ms); export each echo as a series")
    orientations = [h.orientation for h in headers]
    if any(o is None for o in orientations):
        return UNSUPPORTED, "ImageOrientationPatient missing or invalid in some files"
    n_orient = _distinct_orientations(orientations)  # type: ignore[arg-type]
    if n_orient > 1:
        return LOCALIZER, f"slices in {n_orient} orientations (multi-planar localizer)"
    frames = sum(h.frames for h in headers)
    if frames == 1:
        return LOCALIZER, "single slice (scout, localizer or 2D image), not a volume"
    if any(h.enhanced for h in headers):
        return VOLUME, f"{frames} frames in {len(headers)} multi-frame file(s)"
    return VOLUME, f"{len(headers)} slices"


def _series_info(headers: list[_Header], skipped: list[_Skip]) -> SeriesInfo:
    headers = sorted(headers, key=lambda h: str(h.path))
    first = headers[0]
    kind, reason = _classify(headers)
    return SeriesInfo(
        uid=first.series_uid, study_uid=first.study_uid, modality=first.modality,
        description=first.description, paths=tuple(h.path for h in headers),
        patient_id=first.patient_id, study_id=first.study_id,
        series_number=first.series_number,
        plane=_plane([h.orientation for h in headers if h.orientation is not None]),
        kind=kind, reason=reason, issuer_of_patient_id=first.issuer_of_patient_id,
        frame_of_reference_uid=first.frame_of_reference_uid,
        unreadable=_unreadable_members(headers, skipped),
        n_frames=sum(h.frames for h in headers) if any(h.enhanced for h in headers) else 0)


def scan_folder(folder: str | Path) -> ScanResult:
    """Read every file under `folder` (recursively) and group the DICOM ones into series.

    Raises `DicomScanError` when the folder does not exist or holds no DICOM series at all;
    unusable files and series are reported in the result, never raised.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomScanError(f"{folder}: not a folder")
    result = ScanResult(folder)
    groups: dict[str, list[_Header]] = defaultdict(list)
    skipped: list[_Skip] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            header = _read_header(path)
            if isinstance(header, _Skip):
                log.info("skipping %s: %s", path, header.reason)
                skipped.append(header)
                result.skipped_files.append((path, header.reason))
            else:
                groups[header.series_uid].append(header)
    if not groups:
        detail = (f"{len(result.skipped_files)} files, none a DICOM series" if result.skipped_files
                  else "the folder is empty")
        raise DicomScanError(f"{folder}: no DICOM series found ({detail})")
    result.series = sorted((_series_info(h, skipped) for h in groups.values()),
                           key=lambda s: (s.study_uid, s.series_number or 0, s.uid))
    for s in result.series:
        if s.kind != VOLUME:
            log.info("series %s skipped", s.summary())
    return result

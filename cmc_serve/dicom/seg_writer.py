"""Write labels as a DICOM Segmentation (highdicom, BINARY) that viewers such as OHIF open.

Choices, made for viewer compatibility: BINARY (dciodvfy predates LABELMAP and rejects it),
one segment per foreground class present in the labels (a segment without frames confuses
viewers), `omit_empty_frames=True`, and references to every source image. Each segment is
described by its SNOMED CT codes with laterality (`cmc_serve.dicom.codes`) and the algorithm
that made it (`cmc_serve.dicom.derived.Provenance`: model, checksum, mode); source series
whose Type 2 patient/study attributes are absent get them empty. The file is written under
a temporary name and renamed, so a present file is always complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from cmc_common.files import atomic_write
from cmc_serve import __version__
from cmc_serve.dicom.codes import GENERIC, ClassCode, resolve
from cmc_serve.dicom.derived import Provenance, complete_type2
from cmc_serve.dicom.errors import DicomSegError
from cmc_serve.dicom.multiframe import slice_count, source_frame_order
from cmc_serve.volume import count_labels


def check_labels(labels: np.ndarray, source_datasets: Sequence[Dataset],
                 class_names: Sequence[str], out_path: Path,
                 error: type[DicomSegError] = DicomSegError) -> list[int]:
    """The foreground classes present in `labels`, after checking they fit the source series
    ([column, row, slice]) and the class list; `error` naming `out_path` otherwise."""
    n = slice_count(source_datasets)  # an Enhanced multi-frame source: its frames
    if n == 0:
        raise error(f"{out_path}: no source images to reference")
    rows, cols = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if labels.shape != (cols, rows, n):
        raise error(f"{out_path}: labels shape {labels.shape} does not match the source "
                    f"series (columns, rows, slices) = {(cols, rows, n)}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and int(labels.min()) < 0):
        raise error(f"{out_path}: labels must be non-negative integers, got {labels.dtype}")
    if labels.size and int(labels.max()) >= len(class_names):
        raise error(f"{out_path}: label {int(labels.max())} has no class name")
    counts = count_labels(labels, len(class_names))  # no sorted copy as np.unique makes
    present = [int(c) for c in np.flatnonzero(counts) if c != 0]
    if not present:
        raise error(f"{out_path}: no foreground voxels, nothing to write")
    return present


def _descriptions(present: Sequence[int], class_names: Sequence[str],
                  codes: Mapping[str, ClassCode], provenance: Provenance
                  ) -> list[hd.seg.SegmentDescription]:
    algorithm = provenance.algorithm_identification()
    out = []
    for number, cls in enumerate(present, start=1):
        code = codes.get(class_names[cls], GENERIC)
        color = hd.color.CIELabColor.from_rgb(*code.color) if code.color else None
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=class_names[cls][:64],
            segmented_property_category=code.category, segmented_property_type=code.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, display_color=color)
        if code.modifier is not None:  # laterality: Kidney + Left, the SegDB convention
            modifier = hd.sr.CodedConcept.from_code(code.modifier)
            description.SegmentedPropertyTypeCodeSequence[0] \
                .SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(description)
    return out


def write_dicom_seg(labels: np.ndarray, source_datasets: Sequence[Dataset],
                    class_names: Sequence[str], out_path: str | Path, *,
                    codes: Mapping[str, ClassCode] | None = None,
                    provenance: Provenance | None = None,
                    review: str | None = None) -> Path:
    """Write `labels` (uint8, [column, row, slice] on the source grid, slices in the order of
    the sorted `source_datasets`, as `load_series` returns them) as a BINARY DICOM SEG.

    `codes`: class name -> ClassCode (default: `codes.resolve(class_names)`, the shipped
    table). `provenance`: model, mode and engine (series number and description follow it).
    `review` (`cmc_serve.qc.flags.review_text`, "needs review: <reasons>") goes into the
    series and content descriptions, so a flagged SEG says so in any PACS series list.
    """
    out_path = Path(out_path)
    present = check_labels(labels, source_datasets, class_names, out_path)
    codes = resolve(class_names) if codes is None else codes
    provenance = provenance or Provenance()
    description = provenance.series_description("seg", review)
    # class index -> consecutive segment number (highdicom's labelled-array input)
    lut = np.zeros(max(256, len(class_names)), dtype=np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    if present == list(range(1, len(present) + 1)):  # the labels are the segment numbers
        frames = labels.transpose(2, 1, 0)  # (slice, row, column), a view: highdicom reads it
    else:
        frames = np.empty(labels.shape[::-1], dtype=np.uint8)  # (slice, row, column)
        for k in range(labels.shape[2]):  # slice by slice: no second volume-sized temporary
            frames[k] = lut[labels[:, :, k].T]
    order = source_frame_order(source_datasets)
    if order is not None:  # one multi-frame source: highdicom wants its frame order
        frames = frames[np.argsort(order)]
    try:
        seg = hd.seg.Segmentation(
            source_images=complete_type2(source_datasets), pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(present, class_names, codes, provenance),
            series_instance_uid=hd.UID(), series_number=provenance.series_number("seg"),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cmc",
            manufacturer_model_name=provenance.algorithm_name, software_versions=__version__,
            device_serial_number="0", series_description=description,
            content_label="CMC", content_description=description,
            omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomSegError(f"{out_path}: highdicom rejected the segmentation: {exc}") from exc
    # PACS browsers list a study's series by date (Orthanc Explorer files an undated one
    # under "?"): the SEG series is dated when it was made.
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    atomic_write(out_path, lambda tmp: seg.save_as(tmp))
    return out_path

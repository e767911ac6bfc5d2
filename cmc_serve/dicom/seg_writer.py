"""Write labels as a DICOM Segmentation (highdicom, BINARY) that viewers such as OHIF open.

Choices, made for viewer compatibility: BINARY (dciodvfy predates LABELMAP and rejects it),
one segment per foreground class present in the labels (a segment without frames confuses
viewers), `omit_empty_frames=True`, coded SNOMED CT descriptions where the class is a known
organ, algorithm identification "CMC" + version, and references to every source image. The
file is written under a temporary name and renamed, so a present file is always complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cmc_common.files import atomic_write
from cmc_serve import __version__
from cmc_serve.dicom.errors import DicomSegError

# SNOMED CT codes of organs we expect class names for (normalised: lower case, "_" for " ").
ORGAN_CODES: dict[str, Code] = {
    "liver": Code("10200004", "SCT", "Liver"),
    "spleen": Code("78961009", "SCT", "Spleen"),
    "kidney": Code("64033007", "SCT", "Kidney"),
    "left_kidney": Code("18639004", "SCT", "Left kidney"),
    "kidney_left": Code("18639004", "SCT", "Left kidney"),
    "right_kidney": Code("9846003", "SCT", "Right kidney"),
    "kidney_right": Code("9846003", "SCT", "Right kidney"),
    "pancreas": Code("15776009", "SCT", "Pancreas"),
    "gallbladder": Code("28231008", "SCT", "Gallbladder"),
    "stomach": Code("69695003", "SCT", "Stomach"),
    "aorta": Code("15825003", "SCT", "Aorta"),
}
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")


def segment_codes(class_name: str) -> tuple[Code, Code]:
    """(category, type) codes: a known organ, else the generic Tissue/Tissue pair."""
    organ = ORGAN_CODES.get(class_name.strip().lower().replace(" ", "_").replace("-", "_"))
    return (ANATOMICAL_STRUCTURE, organ) if organ else (TISSUE, TISSUE)


def _descriptions(present: Sequence[int], class_names: Sequence[str]
                  ) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="CMC", family=codes.cid7162.ArtificialIntelligence, version=__version__)
    out = []
    for number, cls in enumerate(present, start=1):
        category, kind = segment_codes(class_names[cls])
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=class_names[cls][:64],
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    return out


def write_dicom_seg(labels: np.ndarray, source_datasets: Sequence[Dataset],
                    class_names: Sequence[str], out_path: str | Path, *,
                    series_number: int = 300, series_description: str = "CMC segmentation",
                    review: str | None = None) -> Path:
    """Write `labels` (uint8, [column, row, slice] on the source grid, slices in the order of
    the sorted `source_datasets`, as `load_series` returns them) as a BINARY DICOM SEG.

    `review` (`cmc_serve.qc.flags.review_text`, "needs review: <reasons>") replaces the
    series and content descriptions, so a flagged SEG says so in any PACS series list.
    """
    if review is not None:
        series_description = review
    out_path = Path(out_path)
    n = len(source_datasets)
    if n == 0:
        raise DicomSegError(f"{out_path}: no source images to reference")
    rows, cols = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if labels.shape != (cols, rows, n):
        raise DicomSegError(f"{out_path}: labels shape {labels.shape} does not match the source "
                            f"series (columns, rows, slices) = {(cols, rows, n)}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and int(labels.min()) < 0):
        raise DicomSegError(f"{out_path}: labels must be non-negative integers, "
                            f"got {labels.dtype}")
    if labels.size and int(labels.max()) >= len(class_names):
        raise DicomSegError(f"{out_path}: label {int(labels.max())} has no class name")
    present = [int(c) for c in np.unique(labels) if c != 0]
    if not present:
        raise DicomSegError(f"{out_path}: no foreground voxels, nothing to write")
    # class index -> consecutive segment number (highdicom's labelled-array input)
    lut = np.zeros(max(256, len(class_names)), dtype=np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    frames = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))  # (slice, row, column)
    try:
        seg = hd.seg.Segmentation(
            source_images=list(source_datasets), pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(present, class_names),
            series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cmc",
            manufacturer_model_name="CMC", software_versions=__version__,
            device_serial_number="0", series_description=series_description[:64],
            content_label="CMC", content_description=series_description[:64],
            omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomSegError(f"{out_path}: highdicom rejected the segmentation: {exc}") from exc
    # PACS browsers list a study's series by date (Orthanc Explorer files an undated one
    # under "?"): the SEG series is dated when it was made.
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    atomic_write(out_path, lambda tmp: seg.save_as(tmp))
    return out_path

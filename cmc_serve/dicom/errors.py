"""Error classes of the DICOM path; every message is one line naming the folder or file."""

from __future__ import annotations

from cmc_common.errors import CmcError
from cmc_serve.errors import SegmentError


class DicomError(CmcError, ValueError):
    """Base of all DICOM input/output errors raised by `cmc_serve.dicom`."""


class DicomScanError(DicomError, SegmentError):
    """A folder that cannot be scanned (missing, empty, no DICOM images at all): as INPUT of
    `cmc segment` a refused run, so a SegmentError too."""


class DicomSeriesError(DicomError):
    """A series that cannot be assembled into a correct volume, or no series to choose."""


class DicomSegError(DicomError):
    """Labels or source images that cannot be written as a DICOM Segmentation."""


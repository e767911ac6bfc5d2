"""DICOM in and out: series discovery, validated volume assembly, DICOM SEG writing."""

from cmc_serve.dicom.errors import DicomError, DicomScanError, DicomSegError, DicomSeriesError
from cmc_serve.dicom.scan import ScanResult, SeriesInfo, scan_folder
from cmc_serve.dicom.series import LoadedSeries, SelectionRules, choose_series, load_series

__all__ = ["DicomError", "DicomScanError", "DicomSegError", "DicomSeriesError", "LoadedSeries",
           "ScanResult", "SelectionRules", "SeriesInfo", "choose_series", "load_series",
           "scan_folder"]

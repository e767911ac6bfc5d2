"""Independent checks of the DICOM objects cmc writes: the standard's validator and a reader
that fills RTSTRUCT contours again without any cmc code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (the test is skipped where dicom3tools is absent)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (make system-deps installs dicom3tools)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def fill_rtstruct(path: Path, sources: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """{ROI name: mask [column, row, slice]} from an RTSTRUCT's contours, filled by the
    even-odd rule at the pixel centres of the referenced images (matplotlib's polygon test),
    each contour placed on the image its Contour Image Sequence names."""
    rt = pydicom.dcmread(path)
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")
    centres = np.stack([cc.ravel(), rr.ravel()], axis=1)
    out = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros((cols, rows, len(sources)), bool)
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = index[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            ds = sources[k]
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            offset = points - np.array([float(v) for v in ds.ImagePositionPatient])
            normal = np.cross(iop[:3], iop[3:])
            assert np.abs(offset @ normal).max() < 1e-3  # in the image's plane
            pixel = np.stack([offset @ iop[:3] / col_spacing, offset @ iop[3:] / row_spacing], 1)
            inside = PolygonPath(pixel).contains_points(centres).reshape(cols, rows)
            mask[:, :, k] ^= inside
        out[names[roi.ReferencedROINumber]] = mask
    return out


def dice(x: np.ndarray, y: np.ndarray) -> float:
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total

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
    even-odd rule at the pixel centres of the single-frame `sources` (matplotlib's polygon
    test), each contour placed on the source image whose plane holds its points; when that
    image is the one the Contour Image Sequence names, it must be that one."""
    rt = pydicom.dcmread(path)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    cc, rr = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")
    centres = np.stack([cc.ravel(), rr.ravel()], axis=1)
    origins = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    out = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros((cols, rows, len(sources)), bool)
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            iop = np.array([float(v) for v in sources[0].ImageOrientationPatient])
            normal = np.cross(iop[:3], iop[3:])
            distance = np.abs((points[None] - origins[:, None]) @ normal).max(axis=1)
            (k,) = np.nonzero(distance < 1e-3)[0]  # in exactly one image's plane
            ds = sources[k]
            referenced = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert referenced == ds.SOPInstanceUID or referenced not in {
                s.SOPInstanceUID for s in sources}
            row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
            offset = points - origins[k]
            pixel = np.stack([offset @ iop[:3] / col_spacing, offset @ iop[3:] / row_spacing], 1)
            inside = PolygonPath(pixel).contains_points(centres).reshape(cols, rows)
            mask[:, :, k] ^= inside
        out[names[roi.ReferencedROINumber]] = mask
    return out


def dice(x: np.ndarray, y: np.ndarray) -> float:
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total

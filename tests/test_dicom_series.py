"""cmc_serve.dicom.series: volume assembly from real and synthetic series, and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import SeriesSpec, write_series
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from cmc_serve.dicom import DicomSeriesError, load_series, scan_folder
from cmc_serve.volume import LPS_TO_RAS

DICOMDIRTESTS = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"


def only_series(folder: Path):
    result = scan_folder(folder)
    assert len(result.series) == 1, [s.summary() for s in result.series]
    return result.series[0]


def sitk_ras(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's reading of a series as (array [i, j, k], RAS affine)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(paths[0].parent)))
    image = reader.Execute()
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), LPS_TO_RAS @ lps


def test_real_ct_series_matches_simpleitk() -> None:
    loaded = load_series(only_series(DICOMDIRTESTS / "98892001" / "CT5N"))
    array, affine = sitk_ras(sorted((DICOMDIRTESTS / "98892001" / "CT5N").iterdir()))
    assert loaded.volume.shape == (16, 16, 5)
    np.testing.assert_allclose(loaded.volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(loaded.volume.array, array)
    # headers are kept in slice order (inferior to superior) without pixel data
    z = [float(ds.ImagePositionPatient[2]) for ds in loaded.datasets]
    assert z == sorted(z) and all("PixelData" not in ds for ds in loaded.datasets)


def test_real_ct_series_with_missing_slices_is_refused() -> None:
    with pytest.raises(DicomSeriesError, match=r"CT2: 161 missing slice\(s\) between 17106"):
        load_series(only_series(DICOMDIRTESTS / "77654033" / "CT2"))


ROTATED = (np.cos(0.4), np.sin(0.4), 0.0, 0.0, 0.0, -1.0)  # oblique coronal-ish


@pytest.mark.parametrize("orientation", [
    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # axial
    (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # sagittal
    (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # coronal
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # axial, flipped in-plane
    ROTATED,
])
def test_synthetic_geometry_matches_simpleitk(tmp_path: Path, orientation: tuple) -> None:
    spec = SeriesSpec(orientation=orientation)
    paths = write_series(tmp_path / "s", spec)
    loaded = load_series(only_series(tmp_path / "s"))
    array, affine = sitk_ras(paths)
    np.testing.assert_allclose(loaded.volume.affine, affine, atol=1e-4)
    np.testing.assert_allclose(loaded.volume.array, array)
    expected = spec.stored_values().transpose(2, 1, 0).astype(np.float32) * spec.slope \
        + spec.intercept
    np.testing.assert_array_equal(loaded.volume.array, expected)


def test_rescale_and_monochrome1(tmp_path: Path) -> None:
    spec = SeriesSpec(slope=2.0, intercept=-100.0, photometric="MONOCHROME1")
    write_series(tmp_path / "s", spec)
    vol = load_series(only_series(tmp_path / "s")).volume
    hu = spec.stored_values().transpose(2, 1, 0) * 2.0 - 100.0
    np.testing.assert_allclose(vol.array, hu.max() + hu.min() - hu)


def test_sorting_ignores_instance_number_and_file_order(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=9)
    write_series(tmp_path / "s", spec)  # shuffled files, InstanceNumber reversed
    loaded = load_series(only_series(tmp_path / "s"))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in loaded.datasets])
    assert np.all(np.diff(z) > 0)
    assert loaded.volume.affine[2, 2] == pytest.approx(2.5)
    assert loaded.volume.array[0, 0, -1] > loaded.volume.array[0, 0, 0]


def rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def test_missing_slice(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=7)
    positions = spec.positions()
    del positions[3]
    write_series(tmp_path / "s", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match=r"s: 1 missing slice\(s\) between .*gap 5.000 mm"):
        load_series(only_series(tmp_path / "s"))


def test_duplicate_positions(tmp_path: Path) -> None:
    spec = SeriesSpec()
    positions = spec.positions()
    positions[4] = positions[2]
    write_series(tmp_path / "s", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match="duplicate slice position 45.000 mm"):
        load_series(only_series(tmp_path / "s"))


def test_uneven_spacing(tmp_path: Path) -> None:
    spec = SeriesSpec()
    positions = spec.positions()
    positions[3] = positions[3] + np.array([0.0, 0.0, 0.9])
    write_series(tmp_path / "s", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match="uneven slice spacing"):
        load_series(only_series(tmp_path / "s"))


def test_gantry_tilt(tmp_path: Path) -> None:
    tilt = np.radians(15.0)
    spec = SeriesSpec(orientation=(1.0, 0.0, 0.0, 0.0, np.cos(tilt), np.sin(tilt)))
    # the table moves along z while the image plane is tilted: origins leave the normal
    positions = [np.array(spec.origin) + [0.0, 0.0, 2.5 * k] for k in range(spec.n_slices)]
    write_series(tmp_path / "s", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match=r"gantry tilt .*15.00 degrees"):
        load_series(only_series(tmp_path / "s"))


def test_non_orthogonal_orientation(tmp_path: Path) -> None:
    write_series(tmp_path / "s", SeriesSpec(orientation=(1.0, 0.0, 0.0, 0.3, 0.95, 0.0)))
    with pytest.raises(DicomSeriesError, match="not two orthogonal unit vectors"):
        load_series(only_series(tmp_path / "s"))


def test_mixed_sizes(tmp_path: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.Columns = 6, 20
    ds.PixelData = np.zeros((6, 20), np.uint16).tobytes()
    ds.save_as(paths[2])
    with pytest.raises(DicomSeriesError, match=r"mixed image sizes \[\(6, 20\), \(10, 12\)\]"):
        load_series(only_series(tmp_path / "s"))


def test_truncated_file(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(DicomSeriesError, match=rf"{paths[1].name}: .*(pixel data|truncated)"):
        load_series(only_series(tmp_path / "s"))


def test_missing_pixel_data(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s")
    rewrite(paths[0], PixelData=None)
    # the scan already sees that the file ends after its header: named before any decoding
    with pytest.raises(DicomSeriesError, match=rf"{paths[0].name} \(no pixel data"):
        load_series(only_series(tmp_path / "s"))


def test_missing_geometry_tag(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s")
    rewrite(paths[3], ImagePositionPatient=None)
    with pytest.raises(DicomSeriesError, match=rf"{paths[3].name}: missing ImagePositionPatient"):
        load_series(only_series(tmp_path / "s"))


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s")
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[0])
    with pytest.raises(DicomSeriesError, match=r"cannot decode pixel data \(JPEG-LS Lossless"):
        load_series(only_series(tmp_path / "s"))

"""Slice-geometry tolerance: the rounding a header wrote is accepted, real tilt and gaps are not.

Before, a valid oblique series whose ImagePositionPatient was written with two decimals was
refused as "gantry tilt (0.01 degrees)". The tolerances now follow the written precision
(cmc_serve.dicom.geometry): these tests write oblique series with two decimals (positions
and orientation) and check they load to the geometry they were generated with, and that a
5-degree tilt, a missing slice and a 4 % uneven step are still refused at that precision.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import segment_fixtures as fx
from dicom_factory import SeriesSpec, write_series

from cmc_serve.dicom import DicomSeriesError, choose_series, load_series, scan_folder
from cmc_serve.dicom.geometry import Tolerances, rounding_error, written_decimals
from cmc_serve.dicom.multiframe import FrameSlice


def oblique(angle_deg: float, **overrides: object) -> SeriesSpec:
    """An axial stack rotated about the patient's left-right axis (a double-oblique scan
    plane), written as a scanner rounding to two decimals would."""
    a = math.radians(angle_deg)
    base = dict(orientation=(1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a)), n_slices=20,
                slice_spacing=1.25, origin=(-20.123456, -30.987654, 40.555555),
                position_format=".2f")
    base.update(overrides)
    return SeriesSpec(**base)


def load(folder: Path) -> np.ndarray:
    return load_series(scan_folder(folder).volumes[0]).volume.affine


@pytest.mark.parametrize("orientation_format", [".2f", ".6f"])
def test_oblique_series_written_with_two_decimals_loads(tmp_path: Path,
                                                        orientation_format: str) -> None:
    spec = oblique(17.0, orientation_format=orientation_format)
    write_series(tmp_path / "s", spec)
    affine = load(tmp_path / "s")
    exact = fx.dicom_affine(spec)
    # rounded values carry their error into the affine: 0.005 mm per position (the slice
    # step is their median difference), 0.005 per cosine with a two-decimal orientation
    np.testing.assert_allclose(affine[:3, 3], exact[:3, 3], atol=0.01)
    np.testing.assert_allclose(affine[:3, :3], exact[:3, :3], atol=0.01)


def test_oblique_series_with_a_5_degree_tilt_is_still_refused(tmp_path: Path) -> None:
    spec = oblique(17.0)
    tilt = math.tan(math.radians(5.0)) * spec.slice_spacing
    row = np.asarray(spec.orientation[:3])
    positions = [p + k * tilt * row for k, p in enumerate(spec.positions())]
    write_series(tmp_path / "s", spec, positions=positions)
    with pytest.raises(DicomSeriesError,
                       match=r"gantry tilt or sheared stack, (4\.9|5\.0)\d degrees"):
        load(tmp_path / "s")


def test_small_tilt_beyond_rounding_is_refused(tmp_path: Path) -> None:
    """0.5 degrees over 24 mm drifts 0.2 mm: far below a voxel, far above two decimals."""
    spec = oblique(0.0)
    tilt = math.tan(math.radians(0.5)) * spec.slice_spacing
    positions = [p + np.array([0.0, k * tilt, 0.0]) for k, p in enumerate(spec.positions())]
    write_series(tmp_path / "s", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match="gantry tilt"):
        load(tmp_path / "s")


def test_gap_and_uneven_step_still_refused_at_two_decimals(tmp_path: Path) -> None:
    spec = oblique(17.0)
    positions = spec.positions()
    del positions[7]
    write_series(tmp_path / "gap", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match=r"1 missing slice\(s\)"):
        load(tmp_path / "gap")
    positions = spec.positions()
    positions[8:] = [p + 0.05 * spec.normal() for p in positions[8:]]  # one step 4 % long
    write_series(tmp_path / "uneven", spec, positions=positions)
    with pytest.raises(DicomSeriesError, match=r"uneven slice spacing: 1\.3\d\d mm"):
        load(tmp_path / "uneven")


def test_tolerances_follow_the_written_precision() -> None:
    assert [written_decimals(v) for v in ("12.50", "40", "-7.1", "1.5e-05", "2E3")] == \
        [2, 0, 1, 6, 0]
    assert rounding_error([("40", "42.55")]) == pytest.approx(0.005)  # "40" is 40.00
    assert rounding_error([("40", "41")]) == pytest.approx(0.005)  # at least two decimals
    assert rounding_error([("0.123456",)]) == pytest.approx(5e-7)

    def frame(position: tuple[str, ...], orientation: tuple[str, ...]) -> FrameSlice:
        return FrameSlice("f", Path("f"), 0, 0, orientation, position, ("1", "1"), 2, 2, "")

    coarse = Tolerances.of([frame(("1.25", "2", "3"), ("1", "0", "0", "0", "0.94", "0.34"))])
    fine = Tolerances.of([frame(("1.250000", "2", "3"),
                                ("1", "0", "0", "0", "0.939693", "0.342020"))])
    assert coarse.position == pytest.approx(2 * math.sqrt(3) * 0.005)
    distances = np.array([10.0, 30.0, 300.0])  # a 5-degree tilt drifts twice the allowance
    assert np.all(coarse.drift(distances) < distances * math.tan(math.radians(5.0)) / 2)
    axial = Tolerances.of([frame(("1.25", "2", "3"), ("1", "0", "0", "0", "1", "0"))])
    assert axial.normal == 0.0  # whole cosines are exact
    assert float(fine.drift(np.array([0.0]))[0]) == pytest.approx(0.01)  # the floor
    assert fine.spacing(2.5) == pytest.approx(0.025)  # 1 % of the step


def test_two_echoes_in_one_mr_series_are_refused_naming_the_echo_times(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.2703"
    first = SeriesSpec(modality="MR", echo_time=2.3, intercept=0.0)
    write_series(tmp_path / "mr", first, prefix="E1_")
    write_series(tmp_path / "mr", SeriesSpec(modality="MR", echo_time=4.6, intercept=0.0,
                                             series_uid=first.series_uid), prefix="E2_")
    (series,) = scan_folder(tmp_path / "mr").series
    assert series.kind == "unsupported"
    with pytest.raises(DicomSeriesError, match=r"2 echoes in one series \(EchoTime 2.3, 4.6 "
                                               r"ms\); export each echo as a series"):
        choose_series([series])
    fx.make_model_dir(tmp_path / "model")
    fx.write_phantom_series(tmp_path / "study" / "ct", fx.ct_spec(uid))
    r = fx.segment(tmp_path / "study" / "ct", tmp_path / "mr", "-o", tmp_path / "out",
                   "--model", tmp_path / "model")
    assert r.exit_code == 2  # refused before any case runs
    assert "2 echoes in one series (EchoTime 2.3, 4.6 ms)" in r.stderr


def test_two_echoes_in_one_enhanced_instance_are_named_at_the_duplicate_position() -> None:
    """An Enhanced MR keeps its echoes per frame (MREchoSequence): the scan sees one file,
    so the stack's duplicate positions name the echo times."""
    from cmc_serve.dicom.geometry import stack_geometry

    def frame(k: int, z: str, echo: str) -> FrameSlice:
        return FrameSlice(f"mr.dcm frame {k}", Path("mr.dcm"), 0, k - 1,
                          ("1", "0", "0", "0", "1", "0"), ("0", "0", z), ("1", "1"), 2, 2, echo)

    frames = [frame(1, "0", "2.3"), frame(2, "2.5", "2.3"), frame(3, "0", "4.6"),
              frame(4, "2.5", "4.6")]
    with pytest.raises(DicomSeriesError, match=r"duplicate slice position 0.000 mm in mr.dcm "
                                               r"frame 1 and mr.dcm frame 3 \(EchoTime 2.3 and "
                                               r"4.6 ms: two echoes in one series"):
        stack_geometry(frames, Path("study"))

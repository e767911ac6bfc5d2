"""Inputs that used to give a confident wrong answer with exit 0 are refused, by name, unless
the user states the assumption, which report.json then records per case.

1. two patients (or two unrelated frames of reference) fused as one case;
2. a NIfTI that states no orientation (read mirrored), and the other geometry lies of a NIfTI
   header (pixdims, singular or disagreeing sform/qform);
3. a damaged first or last slice dropped from a DICOM series, and a damaged middle slice
   reported as a "missing slice".

The model is the threshold model of segment_fixtures (a real ONNX graph): the labels a run
must write are known exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import segment_fixtures as fx

from cmc_serve.compatibility import Assumptions, CompatibilityError, ImageFacts
from cmc_serve.engine import Segmenter
from cmc_serve.pipeline import SegmentOptionError, SegmentOptions, segment

STUDY_1 = "1.2.826.0.1.3680043.8.498.1901"
STUDY_2 = "1.2.826.0.1.3680043.8.498.1902"
SHAPE = (22, 20, 12)
AFFINE = fx.ras_affine(fx.SPACING, SHAPE)
NO_OUTPUT = [".cmc-output", "failures.csv", "report.html", "report.json"]


def _run(*args: object) -> object:
    return fx.segment(*args, "--runtime", "onnxruntime")


def _line(stderr: str, fragment: str) -> str:
    lines = [line for line in stderr.splitlines() if fragment in line]
    assert lines, stderr
    return lines[0]


def _case(out: Path) -> dict:
    (case,) = json.loads((out / "report.json").read_text())["cases"]
    return case


def _retag(folder: Path, **tags: str) -> None:
    """Set DICOM attributes on every file of a series folder."""
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _ct_and_mr(root: Path, mr_study: str = STUDY_1, **mr_tags: str) -> tuple[Path, Path]:
    ct, mr = root / "ct", root / "mr"
    fx.write_phantom_series(ct, fx.ct_spec(STUDY_1))
    fx.write_phantom_series(mr, fx.mr_spec(mr_study))
    if mr_tags:
        _retag(mr, **mr_tags)
    return ct, mr


# ------------------------------------------------------------------ 1. identity of a pair

def test_two_patients_given_as_a_pair_are_refused(tmp_path: Path, model_dir: Path) -> None:
    ct, mr = _ct_and_mr(tmp_path, STUDY_2, PatientID="OTHER-2")
    out = tmp_path / "out"
    for extra in ((), ("--assume-registered",)):  # nothing overrides a different patient
        r = _run(ct, mr, "-o", out, "--model", model_dir, *extra)
        assert r.exit_code == 1, r.output
        line = _line(r.stderr, "are different patients")
        assert line.startswith("FAILED ") and "(pair)" in line
        assert "'PHANTOM-1'" in line and "'OTHER-2'" in line
        assert fx.case_files(out) == NO_OUTPUT


def test_same_patient_id_from_two_issuers_is_refused(tmp_path: Path, model_dir: Path) -> None:
    ct, mr = _ct_and_mr(tmp_path, IssuerOfPatientID="HOSPITAL-B")
    _retag(ct, IssuerOfPatientID="HOSPITAL-A")
    r = _run(ct, mr, "-o", tmp_path / "out", "--model", model_dir)
    assert r.exit_code == 1, r.output
    assert "comes from different issuers ('HOSPITAL-A', 'HOSPITAL-B')" in r.stderr


def test_unrelated_frames_of_reference_need_assume_registered(tmp_path: Path,
                                                              model_dir: Path) -> None:
    """Same patient, another study: world coordinates are unrelated unless the user says so."""
    ct, mr = _ct_and_mr(tmp_path, STUDY_2)
    out = tmp_path / "out"
    r = _run(ct, mr, "-o", out, "--model", model_dir)
    assert r.exit_code == 1, r.output
    line = _line(r.stderr, "different frames of reference")
    assert f"({STUDY_1}.9 vs {STUDY_2}.9)" in line and "--assume-registered" in line
    assert fx.case_files(out) == NO_OUTPUT

    r = _run(ct, mr, "-o", out, "--model", model_dir, "--assume-registered")
    assert r.exit_code == 0, r.output
    assert "--assume-registered: " in r.stderr
    case = _case(out)
    assert case["status"] == "done" and case["mode"] == "fused"
    assert "combined because the user asserted they are registered" in \
        case["assumptions"]["assume_registered"]
    assert json.loads((out / "report.json").read_text())["options"]["assume_registered"]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert json.loads((folder / "done").read_text())["assumptions"] == case["assumptions"]
    labels, affine = fx.read_labels(folder / "seg.nii.gz")
    fx.assert_ball_b(labels, affine)


def test_pairing_rules_inside_a_study_check_the_frame_of_reference(tmp_path: Path,
                                                                   model_dir: Path) -> None:
    _ct_and_mr(tmp_path / "study", FrameOfReferenceUID=STUDY_1 + ".77")
    out = tmp_path / "out"
    r = _run(tmp_path / "study", "-o", out, "--model", model_dir)
    assert r.exit_code == 1, r.output
    line = _line(r.stderr, "different frames of reference")
    assert "a (ct) series 3 'abdomen venous'" in line and "b (mr) series 5 't1 coronal'" in line
    # modality a alone combines nothing
    assert _run(tmp_path / "study", "-o", out, "--model", model_dir, "--mode", "a"
                ).exit_code == 0


def _nifti_pair(folder: Path, identity_a: dict | None, identity_b: dict | None
                ) -> tuple[Path, Path]:
    paths = []
    for channel, modality, identity in (("0000", "ct", identity_a), ("0001", "mr", identity_b)):
        path = fx.write_nifti(folder / f"pat_{channel}.nii.gz", fx.phantom(SHAPE, AFFINE, modality),
                              AFFINE)
        if identity is not None:
            (folder / f"pat_{channel}.json").write_text(json.dumps(identity))
        paths.append(path)
    return paths[0], paths[1]


def test_nifti_pair_with_sidecars_of_two_patients_is_refused(tmp_path: Path,
                                                             model_dir: Path) -> None:
    _nifti_pair(tmp_path / "in", {"PatientID": "P1", "SeriesDescription": "ignored"},
                {"PatientID": "P2"})
    out = tmp_path / "out"
    r = _run(tmp_path / "in", "-o", out, "--model", model_dir)
    assert r.exit_code == 1, r.output
    line = _line(r.stderr, "are different patients")
    assert "pat_0000.nii.gz (PatientID 'P1')" in line and "pat_0001.nii.gz (PatientID 'P2')" in line


def test_nifti_pair_frames_of_reference_from_the_python_api(tmp_path: Path,
                                                             model_dir: Path) -> None:
    a, b = _nifti_pair(tmp_path / "in", {"PatientID": "P1", "FrameOfReferenceUID": "1.2.3"},
                       {"PatientID": "P1", "FrameOfReferenceUID": "1.2.4"})
    refused = segment(a, tmp_path / "out1", model_dir, input_b=b)
    assert (refused.done, refused.failed) == (0, 1)
    assert "different frames of reference (1.2.3 vs 1.2.4)" in refused.cases[0].error
    done = segment(a, tmp_path / "out2", model_dir, input_b=b,
                   options=SegmentOptions(assume_registered=True))
    assert done.done == 1
    assert "assume_registered" in done.cases[0].assumptions
    labels, _ = fx.read_labels(tmp_path / "out2" / "pat_0000" / "seg.nii.gz")
    np.testing.assert_array_equal(labels, fx.expected_labels(SHAPE, AFFINE, "fused"))


def test_nifti_without_sidecar_is_noted_not_checked(tmp_path: Path, model_dir: Path) -> None:
    _nifti_pair(tmp_path / "in", {"PatientID": "P1"}, None)
    out = tmp_path / "out"
    r = _run(tmp_path / "in", "-o", out, "--model", model_dir)
    assert r.exit_code == 0, r.output
    notes = [p for p in _case(out)["pairing"] if p.startswith("not checked")]
    assert len(notes) == 2  # a states no frame of reference, b nothing at all
    assert "a (ct)" in notes[0] and notes[0].endswith("does not state its FrameOfReferenceUID")
    assert "b (mr)" in notes[1] and notes[1].endswith(
        "does not state its PatientID or FrameOfReferenceUID")


def test_unreadable_sidecar_is_a_read_error(tmp_path: Path, model_dir: Path) -> None:
    _nifti_pair(tmp_path / "in", {"PatientID": "P1"}, None)
    (tmp_path / "in" / "pat_0001.json").write_text("{PatientID: P1")
    r = _run(tmp_path / "in", "-o", tmp_path / "out", "--model", model_dir)
    assert r.exit_code == 1
    assert "pat_0001.json: the sidecar of pat_0001.nii.gz is not readable JSON" in r.stderr


def test_segmenter_refuses_to_fuse_two_patients(model_dir: Path) -> None:
    """The engine's own entry point applies the same rules when told who the arrays are."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((16, 16, 16), dtype=np.float32) for _ in range(2))
    with Segmenter(model_dir, runtime="onnxruntime") as seg:
        with pytest.raises(CompatibilityError, match="are different patients"):
            seg.segment(a, b, identity_a=ImageFacts("ct", patient_id="P1"),
                        identity_b=ImageFacts("mr", patient_id="P2"))
        ct = ImageFacts("ct", patient_id="P1", frame_of_reference_uid="1.2.3")
        mr = ImageFacts("mr", patient_id="P1", frame_of_reference_uid="1.2.4")
        with pytest.raises(CompatibilityError, match="--assume-registered"):
            seg.segment(a, b, identity_a=ct, identity_b=mr)
        result = seg.segment(a, b, identity_a=ct, identity_b=mr,
                             assumptions=Assumptions(registered=True))
        assert result.mode == "fused" and result.labels.shape == (16, 16, 16)


# ------------------------------------------------------------------ 2. NIfTI geometry

def _write_with_header(path: Path, array: np.ndarray, **fields: object) -> Path:
    """A NIfTI with AFFINE in both forms, then raw header fields overwritten as stored
    (nibabel's writer would recompute them from the affine)."""
    img = nib.Nifti1Image(array.astype(np.float32), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    buffer = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=buffer), "header":
                     nib.FileHolder(fileobj=buffer)})
    data = buffer.getvalue()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(data), check=False)
    for key, value in fields.items():
        if key.startswith("pixdim"):
            header["pixdim"][int(key[-1])] = value
        else:
            header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.binaryblock + data[len(header.binaryblock):])
    return path


def _unoriented(path: Path, modality: str = "ct") -> Path:
    return _write_with_header(path, fx.phantom(SHAPE, AFFINE, modality), qform_code=0,
                              sform_code=0)


def test_nifti_without_orientation_is_refused_not_mirrored(tmp_path: Path,
                                                           model_dir: Path) -> None:
    image = _unoriented(tmp_path / "in" / "img.nii")
    out = tmp_path / "out"
    r = _run(image, "-o", out, "--model", model_dir)
    assert r.exit_code == 1, r.output
    line = _line(r.stderr, "img.nii: the header states no orientation (qform_code = "
                           "sform_code = 0)")
    assert "--assume-orientation" in line and "(read)" in line
    assert fx.case_files(out) == NO_OUTPUT


def test_assume_orientation_reads_it_as_told_and_keeps_it_unstated(tmp_path: Path,
                                                                   model_dir: Path) -> None:
    image = _unoriented(tmp_path / "in" / "img.nii")
    out = tmp_path / "out"
    r = _run(image, "-o", out, "--model", model_dir, "--assume-orientation", "ras")
    assert r.exit_code == 0, r.output
    labels = nib.load(str(out / "img" / "seg.nii.gz"))
    # the phantom was drawn on the RAS grid: told RAS, the labels are exact voxel for voxel
    np.testing.assert_array_equal(np.asarray(labels.dataobj),
                                  fx.expected_labels(SHAPE, AFFINE, "a"))
    assert (int(labels.header["qform_code"]), int(labels.header["sform_code"])) == (0, 0)
    np.testing.assert_allclose(labels.header.get_zooms(), fx.SPACING)
    case = _case(out)
    assert "states no orientation (qform_code = sform_code = 0); read as RAS" in \
        case["assumptions"]["assume_orientation"]
    assert json.loads((out / "report.json").read_text())["options"]["assume_orientation"] == \
        "RAS"


def test_supplied_orientation_cannot_be_fused_by_position_unless_registered(
        tmp_path: Path, model_dir: Path) -> None:
    ct = fx.write_nifti(tmp_path / "in" / "ct.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    mr = _unoriented(tmp_path / "in" / "mr.nii", "mr")
    out = tmp_path / "out"
    r = _run(ct, mr, "-o", out, "--model", model_dir, "--assume-orientation", "RAS")
    assert r.exit_code == 1, r.output
    _line(r.stderr, "mr.nii states no orientation (its axes were supplied by "
                    "--assume-orientation)")
    r = _run(ct, mr, "-o", out, "--model", model_dir, "--assume-orientation", "RAS",
             "--assume-registered")
    assert r.exit_code == 0, r.output
    assert set(_case(out)["assumptions"]) == {"assume_orientation", "assume_registered"}


def test_bad_axis_codes_are_refused_before_running(tmp_path: Path, model_dir: Path) -> None:
    image = _unoriented(tmp_path / "img.nii")
    r = _run(image, "-o", tmp_path / "out", "--model", model_dir, "--assume-orientation", "LRS")
    assert r.exit_code == 2 and "--assume-orientation" in r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(SegmentOptionError) as info:
        SegmentOptions(assume_orientation="XYZ")
    assert info.value.option == "assume_orientation"


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"pixdim2": 0.0}, "header voxel sizes (pixdim) [2.0, 0.0, 2.0] are zero, negative"),
    ({"pixdim1": -2.0, "sform_code": 0}, "header voxel sizes (pixdim) [-2.0, 2.0, 2.0]"),
    ({"srow_y": [0.0, 0.0, 0.0, 0.0]}, "the header's sform (code 1) is singular"),
    ({"srow_x": [-2.0, 0.0, 0.0, 21.0]}, "the header's sform (LAS) and qform (RAS) point the "
                                         "axes in different directions"),
])
def test_nifti_header_that_lies_about_its_geometry_is_refused(
        tmp_path: Path, model_dir: Path, fields: dict, fragment: str) -> None:
    image = _write_with_header(tmp_path / "in" / "img.nii", fx.phantom(SHAPE, AFFINE, "ct"),
                               **fields)
    out = tmp_path / "out"
    r = _run(image, "-o", out, "--model", model_dir)
    assert r.exit_code == 1, r.output
    assert "(read)" in _line(r.stderr, fragment)
    assert fx.case_files(out) == NO_OUTPUT


def test_sform_and_qform_apart_use_the_sform_with_a_recorded_warning(tmp_path: Path,
                                                                     model_dir: Path) -> None:
    shifted = AFFINE[0].copy()
    shifted[3] += 5.0
    image = _write_with_header(tmp_path / "in" / "img.nii", fx.phantom(SHAPE, AFFINE, "ct"),
                               srow_x=shifted)
    out = tmp_path / "out"
    r = _run(image, "-o", out, "--model", model_dir)
    assert r.exit_code == 0, r.output
    (warning,) = _case(out)["warnings"]
    assert "sform and qform place the volume up to 5.00 mm apart; the sform is used" in warning
    assert "warning: " in r.stderr
    _, affine = fx.read_labels(out / "img" / "seg.nii.gz")
    assert affine[0, 3] == pytest.approx(shifted[3])


# ------------------------------------------------------------------ 3. damaged DICOM slices

def _damage(paths: list[Path], where: str, size: int) -> Path:
    """Cut the first / middle / last slice (by position) to `size` bytes."""
    path = {"first": paths[0], "middle": paths[5], "last": paths[-1]}[where]
    path.write_bytes(path.read_bytes()[:size])
    return path


@pytest.mark.parametrize(("where", "size"), [
    ("first", 500),  # header cut before SeriesInstanceUID: used to be dropped (11 slices)
    ("first", 900),  # header cut before Rows/Columns
    ("last", 0),  # an empty file: used to be dropped
    ("middle", 500),  # used to be reported as a "missing slice"
])
def test_damaged_slice_fails_the_series_by_name(tmp_path: Path, model_dir: Path, where: str,
                                                size: int) -> None:
    damaged = _damage(fx.write_phantom_series(tmp_path / "ct", fx.ct_spec(STUDY_1)), where,
                      size)
    out = tmp_path / "out"
    r = _run(tmp_path / "ct", "-o", out, "--model", model_dir)
    assert r.exit_code == 1, r.output
    line = _line(r.stderr, f"cannot be read: {damaged.name} (")
    assert line.startswith("FAILED ") and "(read)" in line and "--skip-unreadable" in line
    assert "missing slice" not in r.stderr
    assert fx.case_files(out) == NO_OUTPUT


@pytest.mark.parametrize("where", ["first", "last"])
def test_skip_unreadable_segments_the_rest_and_records_it(tmp_path: Path, model_dir: Path,
                                                          where: str) -> None:
    spec = fx.ct_spec(STUDY_1)
    damaged = _damage(fx.write_phantom_series(tmp_path / "ct", spec), where, 0)
    out = tmp_path / "out"
    r = _run(tmp_path / "ct", "-o", out, "--model", model_dir, "--skip-unreadable",
             "--output-type", "nifti")
    assert r.exit_code == 0, r.output
    case = _case(out)
    assert f"segmented without 1 unreadable file(s): {damaged.name} (empty file" in \
        case["assumptions"]["skip_unreadable"]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    labels, _ = fx.read_labels(folder / "seg.nii.gz")
    assert labels.shape == (spec.cols, spec.rows, spec.n_slices - 1)


def test_skip_unreadable_never_bridges_a_gap(tmp_path: Path, model_dir: Path) -> None:
    damaged = _damage(fx.write_phantom_series(tmp_path / "ct", fx.ct_spec(STUDY_1)), "middle", 0)
    r = _run(tmp_path / "ct", "-o", tmp_path / "out", "--model", model_dir, "--skip-unreadable")
    assert r.exit_code == 1, r.output
    line = _line(r.stderr, "1 missing slice(s)")
    assert f"(unreadable files skipped: {damaged.name} (empty file" in line


def test_assumptions_asked_for_are_recorded_even_when_not_needed(tmp_path: Path,
                                                                 model_dir: Path) -> None:
    fx.write_phantom_series(tmp_path / "ct", fx.ct_spec(STUDY_1))
    out = tmp_path / "out"
    result = segment(tmp_path / "ct", out, model_dir, options=SegmentOptions(
        runtime="onnxruntime", skip_unreadable=True, assume_orientation="LPS"))
    assert result.done == 1
    assert result.cases[0].assumptions == {
        "assume_orientation": "asked for; this case did not need it",
        "skip_unreadable": "asked for; this case did not need it"}

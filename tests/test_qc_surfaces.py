"""Where quality control shows: report.json, the `done` record, statistics.json, report.html,
the DICOM SEG's descriptions and the console, and nowhere with `--qc off`.

The threshold model of `segment_fixtures` with a real verdict (`assess_case`): a CT whose
field of view starts in the middle of ball A gets the `fov_cut` flag (a check that needs no
training reference), the same CT covering the whole ball none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import segment_fixtures as fx
from browser_fixture import render, require_chromium
from dicom_factory import ROOT_UID
from pydicom.uid import generate_uid

from cmc_serve.pipeline.api import SegmentOptionError, SegmentOptions, segment
from cmc_serve.pipeline.html_report import batch_report_html

# LPS origin of a CT whose x range starts at ball A's centre (RAS x = -8 mm): half of it is cut.
CUT_ORIGIN = (8.0, -19.0, -11.0)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qc_studies")
    fx.write_phantom_series(root / "cut" / "ct", fx.ct_spec(generate_uid(ROOT_UID),
                                                            origin=CUT_ORIGIN))
    fx.write_phantom_series(root / "whole" / "ct", fx.ct_spec(generate_uid(ROOT_UID)))
    return root


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _by_flag(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the flagged case's record, the other one's)."""
    flagged = [c for c in report["cases"] if c["qc"]["flagged"]]
    quiet = [c for c in report["cases"] if not c["qc"]["flagged"]]
    assert len(flagged) == len(quiet) == 1, report["cases"]
    return flagged[0], quiet[0]


@pytest.fixture(scope="module")
def flagged_run(studies: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("qc_on") / "out"
    result = fx.segment(studies, "-o", out, "-m", model_dir, "--mode", "a", "--statistics",
                        "--preview")
    return out, result


def test_a_flagged_case_is_done_exit_zero_and_counted(flagged_run: tuple[Path, Any]) -> None:
    out, result = flagged_run
    assert result.exit_code == 0, result.output
    report = _report(out)
    assert report["counts"]["done"] == 2 and report["flagged"] == 1
    assert report["options"]["qc"] == "on"
    flagged, quiet = _by_flag(report)
    (flag,) = flagged["qc"]["flags"]
    assert flag["code"] == "fov_cut" and flag["structure"] == "bright_a"
    assert "cut off by the field of view" in flag["message"]
    assert flagged["qc"]["score"] < 0.5 <= quiet["qc"]["score"]
    assert flagged["qc"]["structures"]["bright_a"] < 0.5
    assert "seg.dcm" in flagged["outputs"] and "qc" in flagged["timings"]
    assert "needs review" in result.output and "cut off by the field of view" in result.output


def test_done_and_statistics_carry_the_verdict(flagged_run: tuple[Path, Any]) -> None:
    out, _ = flagged_run
    flagged, quiet = _by_flag(_report(out))
    for record in (flagged, quiet):
        done = json.loads((out / record["case_id"] / "done").read_text())
        assert done["qc"] == record["qc"]
    stats = json.loads((out / flagged["case_id"] / "statistics.json").read_text())
    assert stats["qc"]["flagged"] is True and stats["qc"]["flags"] == []  # all per structure
    bright_a = stats["classes"]["bright_a"]["qc"]
    assert bright_a["score"] < 0.5 and [f["code"] for f in bright_a["flags"]] == ["fov_cut"]
    assert stats["classes"]["bright_b"]["qc"] == {"score": 1.0, "flags": []}


def test_the_flagged_seg_says_needs_review(flagged_run: tuple[Path, Any]) -> None:
    out, _ = flagged_run
    flagged, quiet = _by_flag(_report(out))
    seg = pydicom.dcmread(out / flagged["case_id"] / "seg.dcm")
    assert "needs review: fov_cut" in seg.SeriesDescription
    assert "needs review: fov_cut" in seg.ContentDescription
    calm = pydicom.dcmread(out / quiet["case_id"] / "seg.dcm")
    assert "needs review" not in calm.SeriesDescription
    assert "needs review" not in str(calm.get("ContentDescription", ""))


def test_report_html_lists_flagged_cases_first_with_their_reasons(
        flagged_run: tuple[Path, Any]) -> None:
    require_chromium()
    out, _ = flagged_run
    flagged, quiet = _by_flag(_report(out))
    report = _report(out)
    for order in (report["cases"], report["cases"][::-1]):  # whatever the run's order
        page = batch_report_html(out, {**report, "cases": order})
        assert page.index(flagged["case_id"]) < page.index(quiet["case_id"])
    rendered = render((out / "report.html").as_uri(), out.parent / "report.png")
    assert "1 case(s) need review (quality control)" in rendered.dom
    assert "cut off by the field of view" in rendered.dom and "QC score 1.00" in rendered.dom
    assert rendered.pixels().std() > 10  # a rendered page, not a blank one


def test_qc_off_writes_no_verdict_anywhere(studies: Path, model_dir: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = segment(studies, out, model_dir,
                     options=SegmentOptions(mode="a", qc="off", statistics=True))
    assert result.done == 2
    report = _report(out)
    assert report["flagged"] == 0 and report["options"]["qc"] == "off"
    for case in report["cases"]:
        assert case["qc"] is None and "qc" not in case["timings"]
        folder = out / case["case_id"]
        assert json.loads((folder / "done").read_text())["qc"] is None
        stats = json.loads((folder / "statistics.json").read_text())
        assert "qc" not in stats and all("qc" not in c for c in stats["classes"].values())
        assert "needs review" not in pydicom.dcmread(folder / "seg.dcm").SeriesDescription
    assert "QC score" not in (out / "report.html").read_text()
    with pytest.raises(SegmentOptionError, match="qc: 'most' is not one of off, on, full"):
        SegmentOptions(qc="most")


@pytest.fixture(scope="module")
def nifti_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qc_pair")
    shape = (24, 22, 20)
    affine = fx.ras_affine(fx.SPACING, shape)
    return (fx.write_nifti(root / "ct.nii.gz", fx.phantom(shape, affine, "ct"), affine),
            fx.write_nifti(root / "mr.nii.gz", fx.phantom(shape, affine, "mr"), affine))


@pytest.mark.parametrize(("level", "cross"), [("on", False), ("full", True)])
def test_fused_cases_get_branch_agreement_and_full_adds_cross_modal(
        nifti_pair: tuple[Path, Path], model_dir: Path, tmp_path: Path, level: str,
        cross: bool) -> None:
    ct, mr = nifti_pair
    segment(ct, tmp_path / "out", model_dir, mr, SegmentOptions(qc=level))
    (case,) = _report(tmp_path / "out")["cases"]
    signals = case["qc"]["signals"]
    assert case["mode"] == "fused" and not case["qc"]["flagged"]
    # the fixture's two decoders agree everywhere
    assert signals["branches"]["mean_dice"] == pytest.approx(1.0)
    assert ("cross_modal" in signals) is cross
    if cross:
        assert set(signals["cross_modal"]) == {"a", "b"}


def test_an_older_fused_graph_says_the_branch_signal_is_unavailable(
        nifti_pair: tuple[Path, Path], tmp_path: Path) -> None:
    old = fx.make_model_dir(tmp_path / "model", branch_outputs=False)
    ct, mr = nifti_pair
    result = segment(ct, tmp_path / "out", old, mr)
    assert result.done == 1
    (case,) = _report(tmp_path / "out")["cases"]
    assert case["qc"]["signals"]["branches"].startswith("unavailable: the fused graph")


def test_merged_shards_count_the_flagged_cases(studies: Path, model_dir: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    for index in (1, 2):
        segment(studies, out, model_dir, options=SegmentOptions(mode="a", shard=(index, 2)))
    merged = _report(out)
    assert merged["merged_shards"] == 2 and merged["counts"]["done"] == 2
    assert merged["flagged"] == 1

"""Case discovery (NIfTI files, DICOM trees), case ids, shards, and series pairing rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import segment_fixtures as fx

from cmc_serve.pipeline.cases import (
    CaseDiscoveryError,
    discover_cases,
    sanitise,
    select_shard,
)
from cmc_serve.pipeline.pairing import (
    PairingError,
    PairingRules,
    SeriesSummary,
    dicom_modality,
    pair_series,
)
from cmc_serve.pipeline.shard_env import ShardChoiceError, parse_shard

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
IMAGE = np.ones((4, 4, 4), np.float32)


def _nifti(path: Path) -> None:
    fx.write_nifti(path, IMAGE, AFFINE)


def test_nifti_folder_cases(tmp_path: Path) -> None:
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "solo.nii", "sub/deep case.nii.gz",
                 "a b.nii.gz", "a_b.nii.gz"):
        _nifti(tmp_path / name)
    (tmp_path / "readme.txt").write_text("ignored: DICOM scan finds no series here")
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a_b", "a_b-2", "p1", "solo", "sub_deep_case"]
    p1 = cases[2]
    assert {s.role: s.path.name for s in p1.sources} == {"a": "p1_0000.nii.gz",
                                                         "b": "p1_0001.nii.gz"}
    assert [s.role for s in discover_cases(tmp_path / "solo.nii", single_role="b")[0].sources
            ] == ["b"]
    assert [c.case_id for c in discover_cases(tmp_path)] == [c.case_id for c in cases]


def test_sanitise() -> None:
    assert sanitise("../../etc/passwd") == "etc_passwd"
    assert sanitise("Müller, Hans^01") == "M_ller_Hans_01"
    assert sanitise("...") == "case"
    assert len(sanitise("x" * 500)) == 64


def test_dicom_tree_groups_series_by_study(tmp_path: Path) -> None:
    for i, uid in enumerate(("1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12")):
        fx.write_phantom_series(tmp_path / f"s{i}" / "ct", fx.ct_spec(uid, n_slices=3))
        fx.write_phantom_series(tmp_path / f"s{i}" / "mr", fx.mr_spec(uid, n_slices=3))
    (tmp_path / "s0" / "DICOMDIR.txt").write_text("stray file")
    cases = discover_cases(tmp_path)
    assert len(cases) == 2
    assert all(c.case_id.startswith("PHANTOM-1_") for c in cases)
    assert len({c.case_id for c in cases}) == 2
    for case in cases:
        assert case.is_dicom
        assert sorted(s.summary.modality for s in case.sources) == ["CT", "MR"]
        assert len({s.series.study_uid for s in case.sources}) == 1
    assert [c.case_id for c in discover_cases(tmp_path)] == [c.case_id for c in cases]


def test_two_inputs_fix_the_roles(tmp_path: Path) -> None:
    _nifti(tmp_path / "ct.nii.gz")
    _nifti(tmp_path / "mr.nii.gz")
    (case,) = discover_cases(tmp_path / "ct.nii.gz", tmp_path / "mr.nii.gz")
    assert case.case_id == "ct"
    assert [(s.role, s.path.name) for s in case.sources] == [("a", "ct.nii.gz"),
                                                           ("b", "mr.nii.gz")]
    with pytest.raises(CaseDiscoveryError, match="nope.nii.gz: no such file"):
        discover_cases(tmp_path / "ct.nii.gz", tmp_path / "nope.nii.gz")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(CaseDiscoveryError, match="x.txt: not a NIfTI file"):
        discover_cases(tmp_path / "x.txt")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 11])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_partition_the_cases(tmp_path: Path, n: int, count: int) -> None:
    for i in range(n):
        _nifti(tmp_path / f"c{i:02d}.nii.gz")
    cases = discover_cases(tmp_path) if n else []
    shards = [select_shard(cases, i, count) for i in range(1, count + 1)]
    ids = [c.case_id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.case_id for c in cases)  # each case exactly once
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1  # balanced
    assert select_shard(list(reversed(cases)), 1, count) == shards[0]  # order-independent


@pytest.mark.parametrize("text", ["0/2", "3/2", "a/b", "1", "1/0"])
def test_bad_shard(text: str) -> None:
    with pytest.raises(ShardChoiceError, match="expected I/N"):
        parse_shard(text)
    assert parse_shard(" 2 / 3 ") == (2, 3)


# ----------------------------------------------------------------------------- pairing

def _s(uid: str, modality: str, description: str, slices: int = 50,
       number: int | None = None) -> SeriesSummary:
    return SeriesSummary(uid, modality, description, number, slices)


def test_default_rules_pair_by_modality_and_skip_localizers() -> None:
    rules = PairingRules.default(("ct", "mr"))
    series = [_s("1", "CT", "Topogram", 300, 1), _s("2", "CT", "venous", 120, 3),
              _s("3", "CT", "arterial", 80, 2), _s("4", "MR", "t2 haste", 40, 7)]
    pairing = pair_series(series, rules)
    assert (pairing.a.uid, pairing.b.uid) == ("2", "4")
    assert pairing.reasons[0].startswith("a (ct) <- series 3 'venous' [CT, 120 files")
    assert "most slices among series 2 'arterial'" in pairing.reasons[0]
    assert "Topogram" not in pairing.reasons[0]  # localizers are not even candidates
    only_ct = pair_series(series[:3], rules)
    assert only_ct.b is None and only_ct.reasons[1].startswith("b (mr): no series matches")


def test_dicom_modality_names() -> None:
    assert [dicom_modality(n) for n in ("ct", "MR", "t1c", "lge", "pet", "xyz")] == [
        "CT", "MR", "MR", "MR", "PT", "XYZ"]


def test_same_dicom_modality_needs_rules(tmp_path: Path) -> None:
    names = ("bssfp", "lge")
    series = [_s("1", "MR", "LGE psir", 12), _s("2", "MR", "cine bSSFP", 30)]
    with pytest.raises(PairingError, match="cannot tell bssfp \\(a\\) from lge \\(b\\)"):
        pair_series(series, PairingRules.default(names))
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("bssfp:\n  description: '(?i)ssfp'\nb:\n  modality: MR\n"
                          "  description: '(?i)lge|psir'\n")
    pairing = pair_series(series, PairingRules.from_yaml(rules_file, names))
    assert (pairing.a.uid, pairing.b.uid) == ("2", "1")
    assert "description ~ /(?i)ssfp/" in pairing.reasons[0]


def test_same_series_for_both_roles_is_refused(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("a: {modality: MR, description: t1}\nb: {modality: MR, "
                          "description: 'post'}\n")
    rules = PairingRules.from_yaml(rules_file, ("t1", "t1c"))
    with pytest.raises(PairingError, match="matches both a and b"):
        pair_series([_s("1", "MR", "t1 post contrast")], rules)


@pytest.mark.parametrize(("text", "message"), [
    ("c: {modality: CT}", "unknown role 'c'"),
    ("a: {modality: CT, colour: red}", "unknown fields \\['colour'\\]"),
    ("a: {description: '(unclosed'}", "a.description: bad regular expression"),
    ("- a\n- b", "must be a mapping"),
    ("a: [1, 2", "cannot read pairing rules"),
])
def test_bad_rules_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(PairingError, match=message):
        PairingRules.from_yaml(path, ("ct", "mr"))

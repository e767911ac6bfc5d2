"""Datalist: round trip, relative paths, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cmc_train.data.datalist import Datalist, DatalistError, Entry


def _files(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _entry(case: str, labelled: bool, modalities: tuple[str, ...] = ("ct", "mr")) -> dict[str, Any]:
    return {"id": case, "image": {m: f"img/{case}_{m}.nii.gz" for m in modalities},
            "label": {m: f"lab/{case}_{m}.nii.gz" for m in modalities} if labelled else {}}


@pytest.fixture
def valid(tmp_path: Path) -> dict[str, Any]:
    for case in ("a", "b", "c", "d"):
        _files(tmp_path, *(f"img/{case}_{m}.nii.gz" for m in ("ct", "mr")),
               *(f"lab/{case}_{m}.nii.gz" for m in ("ct", "mr")))
    return {"modalities": ["ct", "mr"], "classes": ["background", "liver"],
            "labelled": [_entry("a", True)], "unlabelled": [_entry("b", False, ("mr",))],
            "validation": [_entry("c", True)], "test": [_entry("d", True)]}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def test_load_resolves_paths_and_save_round_trips(tmp_path: Path, valid: dict[str, Any]) -> None:
    datalist = Datalist.load(_write(tmp_path, valid))
    assert datalist.modalities == ("ct", "mr")
    assert datalist.labelled[0] == Entry(
        "a", {"ct": tmp_path / "img/a_ct.nii.gz", "mr": tmp_path / "img/a_mr.nii.gz"},
        {"ct": tmp_path / "lab/a_ct.nii.gz", "mr": tmp_path / "lab/a_mr.nii.gz"})
    assert datalist.unlabelled[0].image == {"mr": tmp_path / "img/b_mr.nii.gz"}
    assert datalist.unlabelled[0].label == {}
    # Saved elsewhere, paths stay relative to the new file and resolve to the same files.
    other = tmp_path / "sub" / "copy.json"
    datalist.save(other)
    assert json.loads(other.read_text())["labelled"][0]["image"]["ct"] == "../img/a_ct.nii.gz"
    assert Datalist.load(other) == datalist


def test_calibration_split_is_optional_and_takes_labels_or_none(
        tmp_path: Path, valid: dict[str, Any]) -> None:
    """A datalist written before the calibration split loads with it empty and saves
    without it; calibration entries may carry labels or none (a held-out unlabelled pool)."""
    plain = Datalist.load(_write(tmp_path, valid))
    assert plain.calibration == ()
    plain.save(tmp_path / "again.json")
    assert "calibration" not in json.loads((tmp_path / "again.json").read_text())
    _files(tmp_path, "img/e_ct.nii.gz", "img/e_mr.nii.gz")
    valid["calibration"] = [_entry("e", False), {**_entry("d2", False), "label": {}}]
    valid["calibration"][1]["image"] = {"ct": "img/d_ct.nii.gz"}
    valid["calibration"].append({"id": "d3", "image": {"ct": "img/c_ct.nii.gz"},
                                 "label": {"ct": "lab/c_ct.nii.gz"}})
    datalist = Datalist.load(_write(tmp_path, valid))
    assert [e.id for e in datalist.split("calibration")] == ["e", "d2", "d3"]
    assert datalist.calibration[2].label == {"ct": tmp_path / "lab/c_ct.nii.gz"}
    datalist.save(tmp_path / "with.json")
    assert Datalist.load(tmp_path / "with.json") == datalist


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("classes"), "missing keys ['classes']"),
    (lambda d: d.update(modalities=["ct", "ct"]), "two distinct names"),
    (lambda d: d.update(classes=["background"]), "'classes' must list"),
    (lambda d: d["labelled"][0]["image"].update(pet="img/a_ct.nii.gz"), "unknown modality 'pet'"),
    (lambda d: d["labelled"][0]["image"].update(ct="img/nope.nii.gz"), "does not exist"),
    (lambda d: d["labelled"][0].pop("id"), "non-empty string 'id'"),
    (lambda d: d["unlabelled"].append(_entry("a", False)), "duplicate id 'a'"),
    (lambda d: d["unlabelled"].append(_entry("c2", True)), "carries labels"),
    (lambda d: d["labelled"][0].update(label={}), "has no label"),
    (lambda d: d["validation"][0]["label"].pop("mr"), "validation entry 'c' has no label"),
    (lambda d: d["unlabelled"][0].update(image={}), "no image"),
    (lambda d: d.update(test={}), "'test' must be a list"),
    (lambda d: d.update(calibration={}), "'calibration' must be a list"),
    (lambda d: d.update(calibration=[_entry("a", False)]), "duplicate id 'a'"),
])
def test_bad_datalists_raise_one_clear_error(tmp_path: Path, valid: dict[str, Any],
                                             mutate: Any, message: str) -> None:
    _files(tmp_path, "img/c2_ct.nii.gz", "img/c2_mr.nii.gz", "lab/c2_ct.nii.gz",
           "lab/c2_mr.nii.gz")
    mutate(valid)
    path = _write(tmp_path, valid)
    with pytest.raises(DatalistError) as info:
        Datalist.load(path)
    assert str(path) in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_unreadable_or_non_object_json(tmp_path: Path, content: str) -> None:
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(DatalistError, match="datalist.json"):
        Datalist.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatalistError, match="cannot read datalist"):
        Datalist.load(tmp_path / "absent.json")

"""cmc_serve.dicom.codes: the SNOMED CT table (laterality as a modifier), a user's table at
`cmc export --codes`, recorded in cmc.json and used by `cmc segment`'s DICOM outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import segment_fixtures as fx
from dicom_checks import dciodvfy_errors

from cmc_serve.dicom.codes import CodesError, normalise, read_table, resolve
from cmc_serve.model_dir import ModelDirError, ModelInfo

HEADER = "name,category,type,modifier,color\n"
BODY = "SCT:123037004:Anatomical Structure"


@pytest.mark.parametrize(("name", "key"), [("kidney_r", "kidney_right"),
                                           ("Right Kidney", "kidney_right"),
                                           ("l-kidney", "kidney_left"),
                                           ("left_ventricle", "ventricle_left"),
                                           ("Liver", "liver"), ("bright_a", "bright_a")])
def test_names_normalise_with_laterality(name: str, key: str) -> None:
    assert normalise(name) == key


def test_demo_classes_get_organ_codes_with_laterality() -> None:
    codes = resolve(["background", "liver", "spleen", "kidney_r", "kidney_l", "blob"])
    assert list(codes) == ["liver", "spleen", "kidney_r", "kidney_l", "blob"]
    assert codes["liver"].type.value == "10200004"
    right, left = codes["kidney_r"], codes["kidney_l"]
    assert right.type.value == left.type.value == "64033007"  # Kidney, not "Right kidney"
    assert (right.modifier.value, left.modifier.value) == ("24028007", "7771000")
    assert right.category.value == "123037004"
    assert codes["blob"].type.meaning == "Tissue"  # unknown: the generic pair


@pytest.mark.parametrize(("text", "problem"), [
    ("name,type\nliver,SCT:1:x\n", "row 1: header name,type is not"),
    (HEADER + f"liver,{BODY},SCT:10200004\n", "row 2: type 'SCT:10200004' is not "
                                              "SCHEME:VALUE:MEANING"),
    (HEADER + "liver,SCT:1:x\n", "row 2: name, category and type are required"),
    (HEADER + f"liver,{BODY},SCT:10200004:Liver,,300 1 1\n", "row 2: color '300 1 1'"),
    (HEADER + f"liver,{BODY},SCT:1:Liver\nLiver,{BODY},SCT:1:Liver\n",
     "row 3: class 'Liver' is listed twice"),
    (HEADER + f"liver,{BODY},SCT:1:Liver,,,extra\n", "row 2: more than the 5 columns"),
    (HEADER, "no rows below the header"),
])
def test_a_bad_table_is_refused_naming_file_and_row(tmp_path: Path, text: str,
                                                     problem: str) -> None:
    path = tmp_path / "codes.csv"
    path.write_text(text)
    with pytest.raises(CodesError) as info:
        read_table(path)
    message = str(info.value)
    assert message.startswith(f"{path}") and problem in message and "\n" not in message


def test_a_user_row_for_an_unknown_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "codes.csv"
    path.write_text(HEADER + f"kidny_l,{BODY},SCT:64033007:Kidney,SCT:7771000:Left,\n")
    with pytest.raises(CodesError, match="codes.csv row 2: kidny_l is not a class of the model"):
        resolve(["background", "kidney_l"], read_table(path), where=str(path))


def _with_codes(model_dir: Path, codes: object) -> Path:
    path = model_dir / "cmc.json"
    document = json.loads(path.read_text())
    document["codes"] = codes
    path.write_text(json.dumps(document))
    return model_dir


def test_codes_in_cmc_json_are_checked_and_used_by_segment(tmp_path: Path) -> None:
    """A model directory's codes (as `cmc export --codes` records them) describe the SEG's
    segments; broken codes refuse the model directory in one line."""
    from cmc_serve.dicom.codes import codes_to_json

    table = tmp_path / "codes.csv"
    table.write_text(HEADER + f"bright_a,{BODY},SCT:10200004:Liver,,221 130 101\n"
                     f"bright_b,{BODY},SCT:64033007:Kidney,SCT:7771000:Left,\n")
    codes = codes_to_json(resolve(fx.CLASSES, read_table(table), where=str(table)))
    model = _with_codes(fx.make_model_dir(tmp_path / "model"), codes)
    assert ModelInfo.load(model).codes["bright_b"].modifier.meaning == "Left"
    uid = "1.2.826.0.1.3680043.8.498.93"
    fx.write_phantom_series(tmp_path / "study" / "ct", fx.ct_spec(uid))
    fx.write_phantom_series(tmp_path / "study" / "mr", fx.mr_spec(uid))
    r = fx.segment(tmp_path / "study", "-o", tmp_path / "out", "--model", model, "--runtime",
                   "onnxruntime")
    assert r.exit_code == 0, r.output
    (seg_path,) = (tmp_path / "out").glob("*/seg.dcm")
    seg = pydicom.dcmread(seg_path)
    assert dciodvfy_errors(seg_path) == []
    by_label = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0]
                for s in seg.SegmentSequence}
    assert by_label["bright_a"].CodeMeaning == "Liver"
    assert by_label["bright_b"].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == \
        "7771000"

    broken = _with_codes(fx.make_model_dir(tmp_path / "broken"), {"bright_a": codes["bright_a"]})
    with pytest.raises(ModelDirError, match=r"cmc.json: codes: codes lack the classes bright_b"):
        ModelInfo.load(broken)


def test_export_codes_option(tmp_path: Path) -> None:
    """`cmc export --codes FILE`: a bad file refuses the export in one line naming the file
    and row, creating nothing; a good one is recorded in cmc.json for every class."""
    from export_fixtures import write_micro_checkpoint

    ckpt = write_micro_checkpoint(tmp_path / "micro.pt")
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + f"liver,{BODY},SCT:10200004:Liver,,\nkidney_l,{BODY},Kidney,,\n")
    r = fx.run_cli("export", ckpt, "--out", tmp_path / "refused", "--format", "onnx",
                   "--precision", "fp32", "--modes", "a", "--codes", bad)
    assert r.exit_code == 2
    assert f"cmc export: error: {bad} row 3: type 'Kidney' is not SCHEME:VALUE:MEANING" \
        in r.output
    assert not (tmp_path / "refused").exists()

    good = tmp_path / "codes.csv"
    good.write_text(HEADER + f"kidney_l,{BODY},SCT:64033007:Kidney,SCT:7771000:Left,1 2 3\n")
    r = fx.run_cli("export", ckpt, "--out", tmp_path / "model", "--format", "onnx",
                   "--precision", "fp32", "--modes", "a", "--codes", good)
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp_path / "model" / "cmc.json").read_text())["codes"]
    assert set(recorded) == {"liver", "spleen", "kidney_r", "kidney_l"}
    assert recorded["kidney_l"]["color"] == [1, 2, 3]  # the user's row
    assert recorded["kidney_r"]["modifier"] == ["SCT", "24028007", "Right"]  # the table's
    assert ModelInfo.load(tmp_path / "model").codes["liver"].type.value == "10200004"

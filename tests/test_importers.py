"""AMOS 2022 and MS-CMRSeg 2019 importers on small fake trees laid out like the releases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cmc_cli.main import app
from typer.testing import CliRunner

from cmc_train.data.datalist import Datalist
from cmc_train.data.importers import (
    DatasetLayoutError,
    SplitOptions,
    amos_modality,
    import_amos,
    import_mscmr,
)

AMOS_LABELS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney",
               "6": "liver", "4": "gall bladder", "5": "esophagus"}


def _nii(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 5.0, 1.0])), path)


@pytest.fixture
def amos(tmp_path: Path) -> Path:
    root = tmp_path / "amos22"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": AMOS_LABELS}))
    tiny = np.zeros((4, 4, 2), dtype=np.int16)
    train = [1, 4, 5, 6, 9, 10, 507, 508, 510, 511]
    for case in train:
        _nii(root / "imagesTr" / f"amos_{case:04d}.nii.gz", tiny)
        _nii(root / "labelsTr" / f"amos_{case:04d}.nii.gz", tiny.astype(np.uint8))
    for case in (8, 540):
        _nii(root / "imagesVa" / f"amos_{case:04d}.nii.gz", tiny)
        _nii(root / "labelsVa" / f"amos_{case:04d}.nii.gz", tiny.astype(np.uint8))
    _nii(root / "imagesTs" / "amos_0600.nii.gz", tiny)  # test labels not released
    (root / "imagesTr" / "._amos_0001.nii.gz").write_bytes(b"")  # macOS debris is ignored
    return root


def test_amos_ids_split_into_ct_and_mri() -> None:
    assert [amos_modality(i) for i in (1, 500, 501, 600)] == ["ct", "ct", "mr", "mr"]


def test_amos_import(amos: Path, tmp_path: Path) -> None:
    datalist = import_amos(amos, SplitOptions(labelled_ratio=0.25, seed=3))
    assert datalist.modalities == ("ct", "mr")
    assert datalist.classes[:4] == ("background", "spleen", "right kidney", "left kidney")
    assert len(datalist.classes) == 7 and datalist.classes[6] == "liver"
    train = datalist.labelled + datalist.unlabelled
    assert sorted(e.id for e in train) == sorted(
        f"amos_{c:04d}" for c in (1, 4, 5, 6, 9, 10, 507, 508, 510, 511))
    for entry in train:
        (modality,) = entry.image
        assert modality == amos_modality(int(entry.id.split("_")[1]))
    # Per modality: round(0.25 * 6) = 2 CT and round(0.25 * 4) = 1 MRI labelled.
    assert sorted(next(iter(e.image)) for e in datalist.labelled) == ["ct", "ct", "mr"]
    assert all(not e.label for e in datalist.unlabelled)
    assert [e.id for e in datalist.validation] == ["amos_0008", "amos_0540"]
    assert datalist.test == ()  # imagesTs without labels cannot be evaluated
    # The seed decides which cases are labelled; the same seed, the same split.
    again = import_amos(amos, SplitOptions(labelled_ratio=0.25, seed=3))
    assert again == datalist
    other = [import_amos(amos, SplitOptions(labelled_ratio=0.25, seed=s)).labelled
             for s in range(4, 10)]
    assert any(o != datalist.labelled for o in other)
    path = tmp_path / "out" / "amos.json"
    datalist.save(path)
    assert Datalist.load(path) == datalist


def test_amos_without_validation_folder_carves_one(amos: Path) -> None:
    for sub in ("imagesVa", "labelsVa"):
        for f in (amos / sub).iterdir():
            f.unlink()
        (amos / sub).rmdir()
    datalist = import_amos(amos, SplitOptions(labelled_ratio=0.2, val_fraction=0.2))
    assert sorted(next(iter(e.image)) for e in datalist.validation) == ["ct", "mr"]
    assert all(set(e.label) == set(e.image) for e in datalist.validation)


def test_amos_layout_errors(tmp_path: Path, amos: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="no imagesTr"):
        import_amos(tmp_path / "missing", SplitOptions())
    (amos / "dataset.json").write_text(json.dumps({"name": "AMOS"}))
    with pytest.raises(DatasetLayoutError, match="dataset.json"):
        import_amos(amos, SplitOptions())


@pytest.fixture
def mscmr(tmp_path: Path) -> Path:
    """The 2019 release: c0t2lge/ images, c0gt/ lgegt/ t2gt/ manual labels."""
    root = tmp_path / "C0LET2_nii45_for_challenge19"
    image = np.zeros((6, 6, 3), dtype=np.int16)
    label = np.zeros((6, 6, 3), dtype=np.int16)
    label[0, 0, 0], label[1, 1, 1], label[2, 2, 2], label[3, 3, 0] = 500, 600, 200, 2221
    for patient in range(1, 9):
        for seq in ("C0", "LGE", "T2"):
            _nii(root / "c0t2lge" / f"patient{patient}_{seq}.nii.gz", image)
        _nii(root / "c0gt" / f"patient{patient}_C0_manual.nii.gz", label)
        _nii(root / "t2gt" / f"patient{patient}_T2_manual.nii.gz", label)
    for patient in range(1, 5):  # LGE labels only for a few patients, as released
        _nii(root / "lgegt" / f"patient{patient}_LGE_manual.nii.gz", label)
    return root


def test_mscmr_import_pairs_sequences_and_remaps_labels(mscmr: Path, tmp_path: Path) -> None:
    out = tmp_path / "lists"
    datalist = import_mscmr(mscmr, SplitOptions(labelled_ratio=0.2, seed=0, val_fraction=0.2),
                            ("bssfp", "lge"), out)
    assert datalist.modalities == ("bssfp", "lge")
    assert datalist.classes == ("background", "lv", "rv", "myo")
    everything = datalist.labelled + datalist.unlabelled + datalist.validation
    assert sorted(int(e.id.removeprefix("patient")) for e in everything) == list(range(1, 9))
    assert all(set(e.image) == {"bssfp", "lge"} for e in everything)
    # Validation needs both sequences labelled: only patients 1-4 have LGE labels.
    assert datalist.validation
    assert all(set(e.label) == {"bssfp", "lge"} for e in datalist.validation)
    assert all(int(e.id.removeprefix("patient")) <= 4 for e in datalist.validation)
    assert len(datalist.labelled) == 1 and all(not e.label for e in datalist.unlabelled)
    remapped = nib.load(datalist.validation[0].label["lge"])
    values = np.asarray(remapped.dataobj)
    assert remapped.get_data_dtype() == np.uint8
    assert (values[0, 0, 0], values[1, 1, 1], values[2, 2, 2], values[3, 3, 0]) == (1, 2, 3, 0)
    assert str(remapped.get_filename()).startswith(str(out / "labels_remapped"))
    np.testing.assert_allclose(remapped.affine, np.diag([1.5, 1.5, 5.0, 1.0]))
    datalist.save(out / "mscmr.json")
    assert Datalist.load(out / "mscmr.json") == datalist


def test_mscmr_errors(mscmr: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two distinct MS-CMRSeg sequences"):
        import_mscmr(mscmr, SplitOptions(), ("bssfp", "flair"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match="no patientN"):
        import_mscmr(empty, SplitOptions(), ("bssfp", "lge"), tmp_path)
    (mscmr / "c0gt" / "patient3_C0_manual.nii.gz").rename(
        mscmr / "c0gt" / "patient99_C0_manual.nii.gz")
    with pytest.raises(DatasetLayoutError, match="labels without images"):
        import_mscmr(mscmr, SplitOptions(), ("bssfp", "lge"), tmp_path)


def test_cli_import(amos: Path, mscmr: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli" / "amos.json"
    result = runner.invoke(app, ["import", "amos", str(amos), "--out", str(out),
                                 "--labelled-ratio", "0.5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(Datalist.load(out).labelled) == 5  # 3 of 6 CT + 2 of 4 MRI
    out = tmp_path / "cli" / "mscmr.json"
    result = runner.invoke(app, ["import", "mscmr", str(mscmr), "--out", str(out),
                                 "--modalities", "bssfp,t2"])
    assert result.exit_code == 0, result.output
    assert Datalist.load(out).modalities == ("bssfp", "t2")
    bad = runner.invoke(app, ["import", "mscmr", str(mscmr), "--modalities", "lge"])
    assert bad.exit_code == 2 and "two names" in bad.output
    bad = runner.invoke(app, ["import", "brats", str(mscmr)])
    assert bad.exit_code == 2

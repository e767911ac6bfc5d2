"""Every command reports a refused run the same way (cli/errors.py): one stderr line
`cmc <command>: error: <message naming the file>` and exit code 2; nothing on stdout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import segment_fixtures as fx


def _synth(tmp: Path) -> tuple[list[object], Path]:
    (tmp / "busy").mkdir()
    (tmp / "busy" / "keep.txt").write_text("mine")
    return ["synth", tmp / "busy"], tmp / "busy"


def _import(tmp: Path) -> tuple[list[object], Path]:
    (tmp / "amos").mkdir()
    return ["import", "amos", tmp / "amos", "--out", tmp / "datalist.json"], tmp / "amos"


def _train(tmp: Path) -> tuple[list[object], Path]:
    return ["train", "--data", tmp / "missing.json", "--out", tmp / "run"], tmp / "missing.json"


def _evaluate(tmp: Path) -> tuple[list[object], Path]:
    return (["evaluate", tmp / "missing.pt", "--data", tmp / "d.json", "--out", tmp / "m.json"],
            tmp / "missing.pt")


def _export(tmp: Path) -> tuple[list[object], Path]:
    return ["export", tmp / "missing.pt", "--out", tmp / "model"], tmp / "missing.pt"


def _segment(tmp: Path) -> tuple[list[object], Path]:
    image = fx.write_nifti(tmp / "ct.nii.gz", fx.phantom((8, 8, 8), fx.ras_affine(
        (2.0, 2.0, 2.0), (8, 8, 8)), "ct"), fx.ras_affine((2.0, 2.0, 2.0), (8, 8, 8)))
    return ["segment", image, "--model", tmp / "nomodel", "--out", tmp / "out"], tmp / "nomodel"


def _merge_shards(tmp: Path) -> tuple[list[object], Path]:
    (tmp / "out").mkdir()
    return ["merge-shards", tmp / "out"], tmp / "out"


def _serve(tmp: Path) -> tuple[list[object], Path]:
    return ["serve", tmp / "nomodel"], tmp / "nomodel"


COMMANDS: dict[str, Callable[[Path], tuple[list[object], Path]]] = {
    "synth": _synth, "import": _import, "train": _train, "evaluate": _evaluate,
    "export": _export, "segment": _segment, "merge-shards": _merge_shards, "serve": _serve}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_refused_run_is_one_error_line_and_exit_2(command: str, tmp_path: Path) -> None:
    args, named = COMMANDS[command](tmp_path)
    r = fx.run_cli(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"cmc {command}: error: ") and str(named) in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("command", ["segment", "listen"])
@pytest.mark.parametrize(("args", "flag"), [(["--output-type", "bogus"], "--output-type"),
                                            (["--precision", "fp8"], "--precision")])
def test_bad_segmentation_option_names_the_flag_typed(command: str, args: list[str], flag: str,
                                                      tmp_path: Path) -> None:
    """`cmc segment` and `cmc listen` share the segmentation options: a bad value is blamed
    on the flag the user typed, not on the library field behind it (output_types)."""
    where = [tmp_path / "in.nii.gz", "--out", tmp_path / "out"] if command == "segment" else []
    r = fx.run_cli(command, *where, "--model", tmp_path / "model", *args)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for {flag}:" in " ".join(r.stderr.split()), r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()

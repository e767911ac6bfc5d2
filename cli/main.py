"""`cmc`: train, export and serve CMC segmentation models.

Each sub-command lives in its own module (cli/<name>_cmd.py, dashes as underscores) and imports the heavy libraries
inside its function, so `cmc --help` answers without loading PyTorch. Every command is
registered through `errors.reporting`, the one place a `CmcError` becomes its error line and
exit code.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
import typer.rich_utils

from .errors import reporting

# Rich draws --help 80 columns wide when stdout is no terminal (piped to a file or `less`) and
# cuts what does not fit ("--skip-unreada…"), while refusals name those options: piped help is
# drawn wide enough for every option name and value. TERMINAL_WIDTH or COLUMNS still win.
PIPED_HELP_WIDTH = 160
if not sys.stdout.isatty() and not {"TERMINAL_WIDTH", "COLUMNS"} & set(os.environ):
    typer.rich_utils.MAX_WIDTH = PIPED_HELP_WIDTH

app = typer.Typer(
    name="cmc",
    help="CMC: semi-supervised two-modality 3D segmentation, from training to the clinic.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMANDS = {
    "synth": "Write a synthetic two-modality phantom study (NIfTI, optional DICOM) and its datalist.",
    "import": "Write a datalist for a public dataset layout (AMOS 2022, MS-CMRSeg 2019).",
    "check-data": "Check a datalist's images and labels as `cmc train` does before its first step.",
    "train": "Train a CMC model from a datalist; writes checkpoints and metrics.",
    "evaluate": "Dice and HD95 per class and modality of a checkpoint on a datalist split.",
    "export": "Export a checkpoint to ONNX / OpenVINO / TensorRT with parity gates and a Triton repository.",
    "segment": "Segment NIfTI files or DICOM series (single case or whole folders) with an exported model.",
    "merge-shards": "Merge the records of `cmc segment --shard I/N` runs into one report.json and report.html.",
    "serve": "Serve an exported model repository with a local Triton server.",
    "listen": "A DICOM node: receive studies (C-STORE), segment each, send the SEG back.",
}


def _register(name: str, help_text: str) -> None:
    module = importlib.import_module(f".{name.replace('-', '_')}_cmd", __package__)
    app.command(name, help=help_text)(reporting(name, module.command))


for _name, _help in _COMMANDS.items():
    _register(_name, _help)


if __name__ == "__main__":
    app()

"""Write `cmc.json`: the one writer of an exported model directory's description.

`cmc export`, the benchmarks and the test fixtures all describe a model directory as one
`ModelJson` record and write it with `write_model_json`; `cmc_serve.model_dir` is the one
reader (`ModelInfo.load`), and the record's fields mirror what `ModelInfo` parses back, so
the two cannot drift apart. The layout is in docs/DESIGN.md. The file is written atomically
(`cmc_common.files.atomic_write`): a killed export never leaves a half-written cmc.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmc_common.contract import (
    GRAPH_OUTPUT,
    MODE_INPUTS,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    MODEL_JSON,
)
from cmc_common.files import atomic_write, file_digest

# Files a graph file needs beside it (ONNX graphs are written self-contained: no external data).
COMPANION_SUFFIXES = {".xml": (".bin",), ".plan": (".json",)}


def graph_entry(mode: str, runtime: str, precision: str, file: str,
                gate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One entry of cmc.json's `graphs`: the graph file (posix path relative to MODEL_DIR)
    serving (mode, runtime, precision), its I/O names and what its gate measured."""
    return {"mode": mode, "runtime": runtime, "precision": precision, "file": file,
            "inputs": list(MODE_INPUTS[mode]), "output": GRAPH_OUTPUT, "gate": dict(gate or {})}


def refused_entry(mode: str, runtime: str, precision: str, reason: str,
                  gate: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of cmc.json's `refused`: a half-precision graph `--precision auto` left out
    because it failed its gate, with the gate's numbers."""
    return {"mode": mode, "runtime": runtime, "precision": precision, "reason": reason,
            "gate": dict(gate)}


def graph_files(root: Path, rel: str) -> dict[str, dict[str, Any]]:
    """A graph entry's `files`: size and sha256 of the graph file and of its companions
    (OpenVINO weights, a TensorRT plan's metadata), checked before the graph runs."""
    graph = root / rel
    paths = [graph] + [graph.with_suffix(s) for s in COMPANION_SUFFIXES.get(graph.suffix, ())]
    return {p.relative_to(root).as_posix(): file_digest(p) for p in paths}


@dataclass(frozen=True)
class ModelJson:
    """What cmc.json says about the graph files already in a model directory.

    The fields mirror `ModelInfo`'s: `graphs` are `graph_entry` records (their `files`
    checksums are added when written), `triton_backend` (None: no Triton repository) with
    `triton_patch_models` becomes the `triton` section, whose `files` record every file of
    MODEL_DIR/repository. `postprocessing`: the record `cmc evaluate
    --choose-postprocessing` stored in the checkpoint, which serving applies.
    `qc_reference`: the checkpoint's record of its training data and validation agreement
    (`cmc_train.qc_reference`), which quality control judges each case by. `codes`: class
    name -> codes (`cmc_serve.dicom.codes.codes_to_json`) for the DICOM outputs.
    `format_version` other than the current one only serves tests of the reader's refusal.
    """

    name: str
    cmc_version: str
    modalities: Sequence[str]
    classes: Sequence[str]
    patch_size: Sequence[int]
    max_batch: int
    preprocessing: Mapping[str, Any]
    graphs: Sequence[Mapping[str, Any]]
    checkpoint_sha256: str | None = None
    refused: Sequence[Mapping[str, Any]] = ()
    gate_thresholds: Mapping[str, Any] | None = None
    triton_backend: str | None = None
    triton_patch_models: Mapping[str, str] = field(default_factory=dict)
    postprocessing: Mapping[str, Any] | None = None
    qc_reference: Mapping[str, Any] | None = None
    codes: Mapping[str, Any] | None = None
    format_version: int = MODEL_FORMAT_VERSION

    def document(self, root: Path, checksums: bool = True) -> dict[str, Any]:
        """The JSON object for the model directory ROOT (its files hashed from disk).

        `checksums` False leaves out the graph entries' `files`, as exports before
        checksums wrote them (tests of how such a directory is still served)."""
        document: dict[str, Any] = {
            "format": MODEL_FORMAT, "format_version": self.format_version,
            "cmc_version": self.cmc_version, "name": self.name,
            "modalities": list(self.modalities), "classes": list(self.classes),
            "patch_size": [int(p) for p in self.patch_size], "max_batch": self.max_batch,
            "preprocessing": dict(self.preprocessing),
            "checkpoint_sha256": self.checkpoint_sha256,
            "graphs": [{**g, "files": graph_files(root, g["file"])} if checksums else dict(g)
                       for g in self.graphs],
            "refused": [dict(r) for r in self.refused],
        }
        if self.gate_thresholds is not None:
            document["gate_thresholds"] = dict(self.gate_thresholds)
        if self.postprocessing:
            document["postprocessing"] = dict(self.postprocessing)
        if self.codes:
            document["codes"] = dict(self.codes)
        if self.qc_reference:
            document["qc_reference"] = dict(self.qc_reference)
        if self.triton_backend is not None:
            repository = root / "repository"
            document["triton"] = {
                "backend": self.triton_backend, "patch_models": dict(self.triton_patch_models),
                "volume_model": self.name,
                "files": {p.relative_to(root).as_posix(): file_digest(p)
                          for p in sorted(repository.rglob("*")) if p.is_file()}}
        return document


def write_model_json(root: Path, model: ModelJson, checksums: bool = True) -> Path:
    """Write ROOT/cmc.json describing the graph files already in ROOT; returns its path.
    `checksums`: see `ModelJson.document`."""
    text = json.dumps(model.document(root, checksums), indent=2) + "\n"
    path = root / MODEL_JSON
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path

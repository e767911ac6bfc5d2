"""Read and validate an exported model directory (`cmc.json`, docs/DESIGN.md).

This is cmc.json's one reader; its one writer is `cmc_serve.model_json.write_model_json`,
whose `ModelJson` record mirrors `ModelInfo`.

`cmc.json` is the only contract between the exporter and the serving side, so everything
the engine relies on (class list, patch size, graph files and their I/O names) is checked
here once, with errors that name the file and the problem: a model directory from another
cmc version or a half-copied export must fail at load time, not halfway through a volume.

Graph files are checked against the size and sha256 that `cmc export` recorded for each of
them (graph entries' `files`): sizes at load (cheap: catches a truncated or half-copied
file), the sha256 of a graph's files when that graph is opened (`verify_files`, once per
file and process). The Triton repository's copies are recorded too (`triton.files`);
`cmc serve` hashes them before it starts the server. A mismatch is a `ModelFileError`
naming the file: a damaged model is the user's problem to see, so it is never a reason for
`--runtime auto` to quietly try another runtime. A cmc.json written before checksums
existed (no `files`) is still read; `ModelInfo.checksums` is then False and `cmc segment`
warns that its files cannot be verified (`unverified_message`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmc_common.contract import (
    MODE_INPUTS,
    MODEL_FORMAT,
    MODEL_JSON,
    MODES,
    PRECISIONS,
    RUNTIMES,
    SUPPORTED_FORMAT_VERSIONS,
    Precision,
    Runtime,
)
from cmc_common.files import file_digest
from cmc_serve.errors import RuntimeUnavailable, SegmentError

if TYPE_CHECKING:
    from cmc_serve.dicom.codes import ClassCode

log = logging.getLogger(__name__)


class ModelDirError(SegmentError, ValueError):
    """The model directory is missing, malformed or from an unsupported version."""


class ModelFileError(ModelDirError):
    """A file of the model directory is damaged: wrong size or checksum, or unreadable."""


class GraphNotExported(ModelDirError, RuntimeUnavailable):
    """The model has no graph for the (mode, runtime, precision) asked for: that runtime
    cannot run it, so `--runtime auto` tries the next one (RuntimeUnavailable)."""


@dataclass(frozen=True)
class ModelFile:
    """One file of the model directory (a graph, OpenVINO weights, a TensorRT plan's
    metadata, a Triton repository copy) with the size and sha256 `cmc export` recorded."""

    path: Path
    size: int
    sha256: str


_VERIFIED: set[tuple[Path, int, int, str]] = set()  # (file, inode, mtime, sha256)
_VERIFIED_LOCK = threading.Lock()


def _damaged(file: ModelFile, problem: str) -> ModelFileError:
    return ModelFileError(f"{file.path}: {problem}; the model directory is damaged or "
                          "incompletely copied: copy it again or re-export the checkpoint")


def _check_size(file: ModelFile) -> None:
    try:
        size = file.path.stat().st_size
    except OSError as exc:
        raise _damaged(file, f"cannot be read ({exc.strerror or exc})") from exc
    if size != file.size:
        raise _damaged(file, f"{size} bytes, cmc.json records {file.size}")


def verify_files(files: tuple[ModelFile, ...]) -> None:
    """Check the sha256 (and size) of every file; ModelFileError naming the first damaged
    one. Each file is hashed once per process (a batch opens a graph once)."""
    for file in files:
        _check_size(file)
        stat = file.path.stat()
        key = (file.path.resolve(), stat.st_ino, stat.st_mtime_ns, file.sha256)
        with _VERIFIED_LOCK:
            if key in _VERIFIED:
                continue
        try:
            actual = file_digest(file.path)["sha256"]
        except OSError as exc:
            raise _damaged(file, f"cannot be read ({exc.strerror or exc})") from exc
        if actual != file.sha256:
            raise _damaged(file, f"sha256 {actual[:12]}... differs from the "
                                 f"{file.sha256[:12]}... cmc.json records")
        with _VERIFIED_LOCK:
            _VERIFIED.add(key)


@dataclass(frozen=True)
class GraphInfo:
    """One exported patch graph: which mode/runtime/precision it serves and where it lives."""

    mode: str
    runtime: str
    precision: str
    path: Path
    inputs: tuple[str, ...]
    output: str
    gate: dict[str, Any] = field(default_factory=dict)
    files: tuple[ModelFile, ...] = ()  # empty: exported before checksums were recorded


@dataclass(frozen=True)
class ModelInfo:
    """The parsed `cmc.json` of a model directory."""

    root: Path
    name: str
    cmc_version: str
    modalities: tuple[str, str]
    classes: tuple[str, ...]
    patch_size: tuple[int, int, int]
    max_batch: int
    preprocessing: dict[str, Any]
    checkpoint_sha256: str | None
    graphs: tuple[GraphInfo, ...]
    repository_files: tuple[ModelFile, ...] = ()  # repository/ as exported (cmc serve)
    # Chosen by `cmc evaluate --choose-postprocessing` (cmc_serve.postprocess); None: none.
    postprocessing: dict[str, Any] | None = None
    # Class name -> SNOMED CT codes for DICOM outputs (`cmc export --codes`,
    # cmc_serve.dicom.codes); None: exported before codes were recorded, the shipped table.
    codes: Mapping[str, ClassCode] | None = None
    # What quality control judges cases by (cmc_train.qc_reference); None: exported before.
    qc_reference: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def checksums(self) -> bool:
        """Whether cmc.json records the size and sha256 of every graph file."""
        return all(g.files for g in self.graphs)

    @property
    def modes(self) -> tuple[str, ...]:
        """Modes with at least one graph, in canonical order."""
        present = {g.mode for g in self.graphs}
        return tuple(m for m in MODES if m in present)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelInfo:
        """Parse and validate MODEL_DIR/cmc.json; raise ModelDirError on any problem."""
        root = Path(model_dir)
        path = root / MODEL_JSON
        if not root.is_dir():
            raise ModelDirError(f"{root}: not a directory (expected an exported cmc model dir)")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelDirError(f"{path}: missing; {root} is not an exported cmc model dir") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelDirError(f"{path}: cannot read JSON ({exc})") from exc
        return _parse(root, path, data)

    def graph(self, mode: str, runtime: str, precision: str) -> GraphInfo:
        """The graph for (mode, runtime, precision).

        OpenVINO bf16 is an inference-precision hint applied to the fp32 IR (DESIGN.md), so
        without an explicit bf16 entry it resolves to the fp32 IR.
        """
        wanted = [(mode, runtime, precision)]
        if runtime == Runtime.OPENVINO and precision == Precision.BF16:
            wanted.append((mode, runtime, Precision.FP32))
        for key in wanted:
            for g in self.graphs:
                if (g.mode, g.runtime, g.precision) == key:
                    return g
        have = ", ".join(f"{g.mode}/{g.runtime}/{g.precision}" for g in self.graphs)
        raise GraphNotExported(
            f"{self.root / MODEL_JSON}: no graph for mode={mode} runtime={runtime} "
            f"precision={precision} (available: {have})")


def unverified_message(path: Path, cmc_version: str) -> str:
    """What a user is told about a cmc.json without checksums (exported before them)."""
    return (f"{path}: no checksums of the graph files (exported by cmc {cmc_version}, "
            "before they were recorded): a damaged graph file cannot be detected; "
            "re-export the checkpoint to add them")


def _parse(root: Path, path: Path, data: Any) -> ModelInfo:
    def fail(problem: str) -> ModelDirError:
        return ModelDirError(f"{path}: {problem}")

    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise fail(f"format is {got!r}, not {MODEL_FORMAT!r}: not an exported cmc model")
    version = data.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise fail(f"format_version {version!r} is not supported (this cmc reads "
                   f"{list(SUPPORTED_FORMAT_VERSIONS)}; exported by cmc "
                   f"{data.get('cmc_version', '?')}): re-export the checkpoint with this cmc")
    for key in ("modalities", "classes", "patch_size", "max_batch", "preprocessing", "graphs"):
        if key not in data:
            raise fail(f"missing key {key!r}")

    modalities = data["modalities"]
    if (not isinstance(modalities, list) or len(modalities) != 2
            or not all(isinstance(m, str) and m for m in modalities)
            or modalities[0] == modalities[1]):
        raise fail(f"modalities must be two distinct names, got {modalities!r}")
    classes = data["classes"]
    if (not isinstance(classes, list) or not 2 <= len(classes) <= 255
            or not all(isinstance(c, str) for c in classes)):
        raise fail(f"classes must be 2..255 names (background first), got {classes!r}")
    patch = data["patch_size"]
    if (not isinstance(patch, list) or len(patch) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise fail(f"patch_size must be 3 positive integers, got {patch!r}")
    max_batch = data["max_batch"]
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise fail(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(data["preprocessing"], dict):
        raise fail("preprocessing must be an object")
    if not isinstance(data["graphs"], list) or not data["graphs"]:
        raise fail("graphs must be a non-empty list")

    postprocessing = data.get("postprocessing")
    if postprocessing is not None:
        from cmc_serve.postprocess import check_record

        check_record(postprocessing, len(classes), fail)
    qc_reference = data.get("qc_reference")
    if qc_reference is not None and not isinstance(qc_reference, dict):
        raise fail("qc_reference must be an object")
    codes = None
    if data.get("codes") is not None:
        from cmc_serve.dicom.codes import CodesError, codes_from_json

        try:
            codes = codes_from_json(data["codes"], classes, "codes")
        except CodesError as exc:
            raise fail(str(exc)) from None
    graphs = tuple(_parse_graph(root, fail, i, g) for i, g in enumerate(data["graphs"]))
    unchecked = [i for i, g in enumerate(graphs) if not g.files]
    if unchecked and len(unchecked) < len(graphs):
        raise fail(f"graphs{unchecked} have no 'files' checksums while the others do: the "
                   "file was edited; re-export the checkpoint")
    if unchecked:
        log.info(unverified_message(path, str(data.get("cmc_version", "?"))))
    triton = data.get("triton")
    repository = _parse_files(root, fail, "triton", triton.get("files"), None) if isinstance(
        triton, dict) else ()
    for checked in repository:
        _check_size(checked)
    keys = [(g.mode, g.runtime, g.precision) for g in graphs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise fail(f"duplicate graph entries {dupes}")
    return ModelInfo(
        root=root, name=str(data.get("name", "cmc")), cmc_version=str(data.get("cmc_version", "?")),
        modalities=(modalities[0], modalities[1]), classes=tuple(classes),
        patch_size=(patch[0], patch[1], patch[2]), max_batch=max_batch,
        preprocessing=data["preprocessing"], checkpoint_sha256=data.get("checkpoint_sha256"),
        graphs=graphs, repository_files=repository, postprocessing=postprocessing,
        qc_reference=qc_reference, codes=codes)


def _parse_graph(root: Path, fail: Callable[[str], ModelDirError], index: int, g: Any
                 ) -> GraphInfo:
    where = f"graphs[{index}]"
    if not isinstance(g, dict):
        raise fail(f"{where} must be an object")
    for key in ("mode", "runtime", "precision", "file", "inputs", "output"):
        if key not in g:
            raise fail(f"{where} is missing {key!r}")
    mode, runtime, precision = g["mode"], g["runtime"], g["precision"]
    if mode not in MODES:
        raise fail(f"{where}: unknown mode {mode!r} (expected one of {list(MODES)})")
    if runtime not in RUNTIMES:
        raise fail(f"{where}: unknown runtime {runtime!r} (expected one of {list(RUNTIMES)})")
    if precision not in PRECISIONS:
        raise fail(f"{where}: unknown precision {precision!r} (expected one of {list(PRECISIONS)})")
    if tuple(g["inputs"]) != MODE_INPUTS[mode]:
        raise fail(f"{where}: mode {mode} needs inputs {list(MODE_INPUTS[mode])}, "
                   f"got {g['inputs']!r}")
    file = root / str(g["file"])
    if not file.is_file():
        raise fail(f"{where}: graph file {file} does not exist")
    if file.suffix == ".xml" and not file.with_suffix(".bin").is_file():
        raise fail(f"{where}: OpenVINO weights {file.with_suffix('.bin')} do not exist")
    gate = g.get("gate", {})
    files = _parse_files(root, fail, where, g.get("files"), str(g["file"]))
    for checked in files:
        _check_size(checked)
    return GraphInfo(mode=mode, runtime=runtime, precision=precision, path=file,
                     inputs=tuple(g["inputs"]), output=str(g["output"]),
                     gate=gate if isinstance(gate, dict) else {}, files=files)


def _parse_files(root: Path, fail: Callable[[str], ModelDirError], where: str, files: Any,
                 required: str | None) -> tuple[ModelFile, ...]:
    """A `files` object ({relative path: {"size", "sha256"}}) that must list `required`
    (a graph entry's own file); () when absent."""
    if files is None:
        return ()
    if not isinstance(files, dict) or (required is not None and required not in files):
        raise fail(f"{where}: 'files' must map each file"
                   + (f", {required!r} included," if required else "")
                   + " to its size and sha256")
    out = []
    for rel, record in files.items():
        size = record.get("size") if isinstance(record, dict) else None
        sha = record.get("sha256") if isinstance(record, dict) else None
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or not isinstance(sha, str) or len(sha) != 64):
            raise fail(f"{where}: files[{rel!r}] must be {{'size': bytes, 'sha256': hex}}")
        out.append(ModelFile(root / rel, size, sha.lower()))
    return tuple(out)

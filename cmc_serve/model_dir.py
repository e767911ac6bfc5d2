"""Read and validate an exported model directory (`cmc.json`, docs/DESIGN.md).

`cmc.json` is the only contract between the exporter and the serving side, so everything
the engine relies on (class list, patch size, graph files and their I/O names) is checked
here once, with errors that name the file and the problem: a model directory from another
cmc version or a half-copied export must fail at load time, not halfway through a volume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "cmc-model"
SUPPORTED_FORMAT_VERSIONS = (1,)
MODES = ("fused", "a", "b")
RUNTIMES = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
# Graph inputs per mode (DESIGN.md "Graph I/O").
MODE_INPUTS: dict[str, tuple[str, ...]] = {
    "fused": ("image_a", "image_b"),
    "a": ("image_a",),
    "b": ("image_b",),
}


class ModelDirError(ValueError):
    """The model directory is missing, malformed or from an unsupported version."""


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
    # Chosen by `cmc evaluate --choose-postprocessing` (cmc_serve.postprocess); None: none.
    postprocessing: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def modes(self) -> tuple[str, ...]:
        """Modes with at least one graph, in canonical order."""
        present = {g.mode for g in self.graphs}
        return tuple(m for m in MODES if m in present)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelInfo:
        """Parse and validate MODEL_DIR/cmc.json; raise ModelDirError on any problem."""
        root = Path(model_dir)
        path = root / "cmc.json"
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
        if runtime == "openvino" and precision == "bf16":
            wanted.append((mode, runtime, "fp32"))
        for key in wanted:
            for g in self.graphs:
                if (g.mode, g.runtime, g.precision) == key:
                    return g
        have = ", ".join(f"{g.mode}/{g.runtime}/{g.precision}" for g in self.graphs)
        raise ModelDirError(
            f"{self.root / 'cmc.json'}: no graph for mode={mode} runtime={runtime} "
            f"precision={precision} (available: {have})")


def _parse(root: Path, path: Path, data: Any) -> ModelInfo:
    def fail(problem: str) -> ModelDirError:
        return ModelDirError(f"{path}: {problem}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise fail(f"format is {got!r}, not {FORMAT!r}: not an exported cmc model")
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
        from cmc_serve.postprocess import PostprocessError, check_record

        try:
            check_record(postprocessing, len(classes))
        except PostprocessError as exc:
            raise fail(str(exc)) from None
    graphs = tuple(_parse_graph(root, fail, i, g) for i, g in enumerate(data["graphs"]))
    keys = [(g.mode, g.runtime, g.precision) for g in graphs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise fail(f"duplicate graph entries {dupes}")
    return ModelInfo(
        root=root, name=str(data.get("name", "cmc")), cmc_version=str(data.get("cmc_version", "?")),
        modalities=(modalities[0], modalities[1]), classes=tuple(classes),
        patch_size=(patch[0], patch[1], patch[2]), max_batch=max_batch,
        preprocessing=data["preprocessing"], checkpoint_sha256=data.get("checkpoint_sha256"),
        graphs=graphs, postprocessing=postprocessing)


def _parse_graph(root: Path, fail: Any, index: int, g: Any) -> GraphInfo:
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
    return GraphInfo(mode=mode, runtime=runtime, precision=precision, path=file,
                     inputs=tuple(g["inputs"]), output=str(g["output"]),
                     gate=gate if isinstance(gate, dict) else {})

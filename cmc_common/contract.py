"""The names training, export and serving agree on, defined once (stdlib only).

An exported model directory is read by code that never saw the checkpoint (`cmc segment`,
a Triton server, another host), so the names of its modes, runtimes, precisions and
devices, the graph I/O names and the `cmc.json` format are one contract: `cmc_train`,
`cmc_export` and `cmc_serve` import them from here instead of spelling them out. The
`cmc.json` document itself is read and written in one place, `cmc_serve.model_dir`
(`ModelInfo.load`, `write_model_json`); its layout is in docs/DESIGN.md.
"""

from __future__ import annotations

# Inference modes: both modalities fused, or one of them alone (docs/METHOD.md).
MODES: tuple[str, ...] = ("fused", "a", "b")
# The two modality roles; a mode reads the roles of its graph inputs.
ROLES: tuple[str, ...] = ("a", "b")
# Graph inputs per mode and the one output (DESIGN.md "Graph I/O"): softmax probabilities.
MODE_INPUTS: dict[str, tuple[str, ...]] = {
    "fused": ("image_a", "image_b"),
    "a": ("image_a",),
    "b": ("image_b",),
}
GRAPH_OUTPUT = "probs"
# The fused graph also returns each decoder's own softmax (outputs after `probs`), so quality
# control can compare the two branches at no extra network time. Graphs exported before
# these outputs existed have `probs` only and are still served (the branch signal is then
# reported unavailable). Single-modality graphs have `probs` only.
BRANCH_OUTPUTS: tuple[str, str] = ("probs_a", "probs_b")
MODE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "fused": (GRAPH_OUTPUT, *BRANCH_OUTPUTS),
    "a": (GRAPH_OUTPUT,),
    "b": (GRAPH_OUTPUT,),
}

# `auto`: the choice is left to cmc (mode from the images present, runtime, precision).
AUTO = "auto"
# Runtimes that run an exported graph file (what cmc.json's graph entries name).
RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino", "tensorrt")
# Runtimes a segmentation can run on: a graph file, or the patch models of a Triton server.
SERVING_RUNTIMES: tuple[str, ...] = (*RUNTIMES, "triton")
# int8: an NNCF-quantised OpenVINO IR of its own (cmc_export.quantise), judged by its own gate.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# Export formats and the runtime that runs each.
RUNTIME_OF_FORMAT: dict[str, str] = {"onnx": "onnxruntime", "openvino": "openvino",
                                     "tensorrt": "tensorrt"}
EXPORT_FORMATS: tuple[str, ...] = tuple(RUNTIME_OF_FORMAT)

# Sliding-window overlap: the step is patch * (1 - overlap), so overlap 1 would never move;
# above 0.95 the tile count grows past 8000x a non-overlapping grid for no measurable gain.
MAX_OVERLAP = 0.95

# The exported model directory's description file and its format.
MODEL_JSON = "cmc.json"
MODEL_FORMAT = "cmc-model"
MODEL_FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1,)


def check_overlap(overlap: float) -> None:
    """ValueError unless 0 <= overlap <= MAX_OVERLAP (the same limit for every caller)."""
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"overlap must be in the range 0 to {MAX_OVERLAP}, got {overlap}")

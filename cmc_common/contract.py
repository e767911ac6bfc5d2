"""The names training, export and serving agree on, defined once (stdlib only).

An exported model directory is read by code that never saw the checkpoint (`cmc segment`,
a Triton server, another host), so the names of its modes, runtimes, precisions and
devices, the graph I/O names and the `cmc.json` format are one contract: `cmc_train`,
`cmc_export` and `cmc_serve` import them from here instead of spelling them out. The
`cmc.json` document itself is read in one place, `cmc_serve.model_dir` (`ModelInfo.load`),
and written in one, `cmc_serve.model_json` (`write_model_json`); its layout is in
docs/DESIGN.md.

Each vocabulary is a `StrEnum`: a member is the str it stands for (equal to it, same hash,
written as it by json, f-strings and `str.join`; `Vocabulary` makes its repr the value's
too), so cmc.json, report.json, messages and the command line read and write exactly the
plain values, and code compares against a member instead of a bare string a typo would
silently never match.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10, pyproject's floor: enum.StrEnum's behaviour, spelled out
    class StrEnum(str, Enum):
        """A str-valued Enum whose str() (and so format()) is its value, as in 3.11."""

        def __str__(self) -> str:
            return str(self.value)


class Vocabulary(StrEnum):
    """A StrEnum whose repr is its value's too: a message listing the choices (`{MODES}`) or
    showing a value with `!r` reads exactly as it did when they were plain strings."""

    def __repr__(self) -> str:
        return repr(self.value)


class Mode(Vocabulary):
    """Inference modes: both modalities fused, or one of them alone (docs/METHOD.md)."""

    FUSED = "fused"
    A = "a"
    B = "b"


class Runtime(Vocabulary):
    """Where a graph runs: a graph file's runtime, or the patch models of a Triton server."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"
    TRITON = "triton"


class Precision(Vocabulary):
    """Graph precisions; int8 is an NNCF-quantised OpenVINO IR of its own
    (cmc_export.quantise), judged by its own gate."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Device(Vocabulary):
    CPU = "cpu"
    CUDA = "cuda"


class ExportFormat(Vocabulary):
    """`cmc export --format` values, each a folder of the model directory."""

    ONNX = "onnx"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"


class QcLevel(Vocabulary):
    """`cmc segment --qc`: none, the fused answer judged, or also the a-only and b-only
    answers (cmc_serve.pipeline.run_case)."""

    OFF = "off"
    ON = "on"
    FULL = "full"


class OutputType(Vocabulary):
    """`cmc segment --output-type` values (cmc_serve.pipeline.outputs)."""

    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"
    RTSTRUCT = "rtstruct"
    SR = "sr"


# The vocabularies as tuples of their members, in their documented order; typed as str so
# that a value read from a file or the command line indexes what is built from them.
MODES: tuple[str, ...] = tuple(Mode)
# The two modality roles; a mode reads the roles of its graph inputs, and a single-modality
# mode is named by its role.
ROLES: tuple[str, ...] = (Mode.A, Mode.B)
# Graph inputs per mode and the one output (DESIGN.md "Graph I/O"): softmax probabilities.
MODE_INPUTS: dict[str, tuple[str, ...]] = {
    Mode.FUSED: ("image_a", "image_b"),
    Mode.A: ("image_a",),
    Mode.B: ("image_b",),
}
GRAPH_OUTPUT = "probs"
# The fused graph also returns each decoder's own softmax (outputs after `probs`), so quality
# control can compare the two branches at no extra network time. Graphs exported before
# these outputs existed have `probs` only and are still served (the branch signal is then
# reported unavailable). Single-modality graphs have `probs` only.
BRANCH_OUTPUTS: tuple[str, str] = ("probs_a", "probs_b")
MODE_OUTPUTS: dict[str, tuple[str, ...]] = {
    Mode.FUSED: (GRAPH_OUTPUT, *BRANCH_OUTPUTS),
    Mode.A: (GRAPH_OUTPUT,),
    Mode.B: (GRAPH_OUTPUT,),
}

# `auto`: the choice is left to cmc (mode from the images present, runtime, precision,
# output types).
AUTO = "auto"
# Runtimes that run an exported graph file (what cmc.json's graph entries name).
RUNTIMES: tuple[str, ...] = (Runtime.ONNXRUNTIME, Runtime.OPENVINO, Runtime.TENSORRT)
# Runtimes a segmentation can run on: a graph file, or the patch models of a Triton server.
SERVING_RUNTIMES: tuple[str, ...] = (*RUNTIMES, Runtime.TRITON)
PRECISIONS: tuple[str, ...] = tuple(Precision)
DEVICES: tuple[str, ...] = tuple(Device)
# Export formats and the runtime that runs each.
RUNTIME_OF_FORMAT: dict[str, str] = {ExportFormat.ONNX: Runtime.ONNXRUNTIME,
                                         ExportFormat.OPENVINO: Runtime.OPENVINO,
                                         ExportFormat.TENSORRT: Runtime.TENSORRT}
EXPORT_FORMATS: tuple[str, ...] = tuple(ExportFormat)
QC_LEVELS: tuple[str, ...] = tuple(QcLevel)
OUTPUT_TYPES: tuple[str, ...] = tuple(OutputType)

# Sliding-window overlap: the step is patch * (1 - overlap), so overlap 1 would never move;
# above 0.95 the tile count grows past 8000x a non-overlapping grid for no measurable gain.
MAX_OVERLAP = 0.95

# The exported model directory's description file and its format.
MODEL_JSON = "cmc.json"
MODEL_FORMAT = "cmc-model"
MODEL_FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1,)


def patch_model_name(name: str, mode: str) -> str:
    """The Triton model name of a mode's patch graph, as `cmc export` writes the repository
    and the Triton runtime asks for it: `<name>_patch` for fused, `<name>_patch_<mode>` for
    the single-modality graphs."""
    return f"{name}_patch" if mode == Mode.FUSED else f"{name}_patch_{mode}"


def check_overlap(overlap: float) -> None:
    """ValueError unless 0 <= overlap <= MAX_OVERLAP (the same limit for every caller)."""
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"overlap must be in the range 0 to {MAX_OVERLAP}, got {overlap}")

"""What `cmc export` is asked for, checked before any graph is built.

The choices of formats, precisions, modes and Triton backend, and the class codes, are
refused here with one ExportError line naming the value, so that a typo never costs the
user a half-run export (`cmc_export.exporter` runs only what passed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmc_common.contract import AUTO, PRECISIONS, ExportFormat
from cmc_export.errors import ExportError
from cmc_export.triton_repository import BACKENDS

# The export formats each Triton backend can serve (one of them must be requested).
BACKEND_FORMATS = {"python": (ExportFormat.ONNX, ExportFormat.OPENVINO),
                   "onnxruntime": (ExportFormat.ONNX,), "openvino": (ExportFormat.OPENVINO,),
                   "tensorrt": (ExportFormat.TENSORRT,)}


def check_choices(kind: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """`values` without repeats, each one of `allowed`; ExportError naming the others."""
    values = tuple(dict.fromkeys(values))
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise ExportError(f"invalid {kind} {list(unknown or values)}; choose from {list(allowed)}")
    return values


def check_precisions(values: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """(precisions to export, whether each is required); `auto` alone: all, fp32 required."""
    if AUTO in values:
        if tuple(values) != (AUTO,):
            raise ExportError(f"invalid precision {list(values)}: auto cannot be combined with "
                              "named precisions")
        return PRECISIONS, False
    return check_choices("precision", values, PRECISIONS), True


def check_backend(backend: str, formats: Sequence[str]) -> None:
    """ExportError unless `backend` is a Triton backend one of `formats` can feed."""
    if backend not in BACKENDS:
        raise ExportError(f"unknown Triton backend {backend!r}; choose one of {list(BACKENDS)}")
    needed = BACKEND_FORMATS[backend]
    if not set(needed) & set(formats):
        raise ExportError(f"Triton backend {backend} needs format {' or '.join(needed)} "
                          f"(requested {list(formats)})")


def check_name(name: str, max_batch: int) -> None:
    """ExportError unless the Triton model name is usable and the batch size positive."""
    if max_batch < 1:
        raise ExportError(f"max_batch must be >= 1, got {max_batch}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ExportError(f"model name {name!r} must be letters, digits, '_' or '-'")


def class_codes(path: Path | str | None, classes: Sequence[str]) -> dict[str, Any]:
    """cmc.json's `codes`: the user's table (`--codes`) over the shipped one, checked
    against the model's classes before anything is exported (CodesError naming the row)."""
    from cmc_serve.dicom.codes import codes_to_json, read_table, resolve

    overrides = read_table(path) if path is not None else None
    return codes_to_json(resolve(classes, overrides, where=str(path)))

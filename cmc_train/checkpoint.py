"""The CMC checkpoint: one torch file that `torch.load(weights_only=True)` can read.

Layout (docs/DESIGN.md):
    {"format": "cmc-checkpoint", "format_version": 1, "state_dict": {name: tensor},
     "metadata_json": str, "trainer_state": {...}}   # trainer_state only for resumable files

Metadata travels as a JSON string so that any reader (the exporter, a user with plain
`torch.load`) gets the model shape, modalities, classes and pre-processing without
unpickling code. `trainer_state` holds only tensors, numbers, strings, lists and dicts, which
keeps the weights-only loader usable for resume too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from cmc_common.errors import CmcError, one_line
from cmc_common.files import atomic_write
from cmc_train import __version__
from cmc_train.config import ModelConfig, PreprocessConfig

if TYPE_CHECKING:
    from cmc_train.network import CMCNet

FORMAT = "cmc-checkpoint"
FORMAT_VERSION = 1
_METADATA_KEYS = ("cmc_version", "model", "modalities", "classes", "preprocessing", "training")


class CheckpointError(CmcError):
    """A file is not a readable CMC checkpoint of a supported version (message names the file)."""


class LoadedCheckpoint(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    trainer_state: dict[str, Any] | None


def build_metadata(
    model: ModelConfig,
    preprocess: PreprocessConfig,
    classes: list[str],
    training: dict[str, Any],
) -> dict[str, Any]:
    """The metadata dict every checkpoint carries (JSON-serialisable)."""
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} classes")
    return {
        "cmc_version": __version__,
        "model": model.to_dict(),
        "modalities": list(preprocess.modalities),
        "classes": list(classes),
        "preprocessing": preprocess.to_dict(),
        "training": dict(training),
    }


def save_checkpoint(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "metadata_json": json.dumps(metadata, sort_keys=True, allow_nan=True),
    }
    if trainer_state is not None:
        payload["trainer_state"] = trainer_state
    atomic_write(path, lambda tmp: torch.save(payload, tmp), durable=True)


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read and validate a checkpoint; raise CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable torch checkpoint "
                              f"({one_line(exc, first_line=True)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a CMC checkpoint (no 'format': '{FORMAT}' entry)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported CMC checkpoint format_version {version!r} "
            f"(this cmc {__version__} reads version {FORMAT_VERSION})"
        )
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"{path}: corrupt CMC checkpoint (state_dict is not a tensor dict)")
    try:
        metadata = json.loads(payload["metadata_json"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt CMC checkpoint (metadata_json: {exc})") from exc
    missing = [k for k in _METADATA_KEYS if not isinstance(metadata, dict) or k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: corrupt CMC checkpoint (metadata lacks {missing})")
    return LoadedCheckpoint(state_dict, metadata, payload.get("trainer_state"))


def record_postprocessing(path: Path, record: dict[str, Any]) -> None:
    """Store the post-processing `cmc evaluate --choose-postprocessing` chose in the
    checkpoint's metadata ("postprocessing"), replacing an earlier choice. The weights and
    any trainer state are written back unchanged, atomically (`save_checkpoint`)."""
    from cmc_serve.postprocess import check_record

    ckpt = load_checkpoint(path)
    check_record(record, len(ckpt.metadata["classes"]),
                 lambda problem: CheckpointError(f"{path}: {problem}"))
    save_checkpoint(path, ckpt.state_dict, {**ckpt.metadata, "postprocessing": record},
                    ckpt.trainer_state)


def load_model(path: Path) -> tuple[CMCNet, dict[str, Any]]:
    """Rebuild the network a checkpoint describes, load its weights strictly, set eval mode.

    The metadata is checked as a whole here (model config, pre-processing, class names and
    modalities agreeing), so every reader of a checkpoint gets one CheckpointError naming
    the file; a config's own refusal is folded into that line because only this reader
    knows which file held it."""
    from cmc_train.network import build_cmc

    ckpt = load_checkpoint(path)
    metadata = ckpt.metadata
    try:
        cfg = ModelConfig.from_dict(metadata["model"])
        preprocess = PreprocessConfig.from_dict(metadata["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model config or pre-processing in metadata "
                              f"({exc})") from exc
    if len(metadata["classes"]) != cfg.num_classes:
        raise CheckpointError(f"{path}: {len(metadata['classes'])} class names for a model with "
                              f"{cfg.num_classes} classes")
    if list(metadata["modalities"]) != list(preprocess.modalities):
        raise CheckpointError(f"{path}: modalities {metadata['modalities']} differ from the "
                              f"pre-processing's {list(preprocess.modalities)}")
    net = build_cmc(cfg)
    try:
        net.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not match the model config ({one_line(exc, first_line=True)})"
        ) from exc
    net.eval()
    return net, metadata

"""Load the public SAM-Med3D ViT-B (`vit_b_ori`) image encoder into both CMC encoders.

The checkpoint is a torch file whose `model_state_dict` holds `image_encoder.*`,
`prompt_encoder.*` and `mask_decoder.*`. Only the image encoder is used: its prefix is
stripped and every one of its keys must match an encoder parameter by name and shape, and
every SAM-layout encoder parameter must be present; anything else is an error that names the
keys. The CMC adapters (`blocks.N.adapter.*`) are the single exception: they are CMC's own
parameters, absent from any SAM-Med3D file, and keep their identity initialisation.

After loading, the patch embedding, the absolute position embedding and all attention
parameters are frozen (docs/METHOD.md, 'Network'); norms, MLPs, adapters, neck and
everything after the encoders stay trainable.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cmc_common.errors import CmcError
from cmc_train.network.cmc_net import CMCNet
from cmc_train.network.vit3d import ImageEncoderViT3D

ENCODER_PREFIX = "image_encoder."
IGNORED_PREFIXES = ("prompt_encoder.", "mask_decoder.")
ADAPTER_MARK = ".adapter."
# SAM-Med3D's training script stores `args` (an argparse.Namespace) next to the weights.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"  # legacy torch.save format starts with a pickle protocol marker


class SamMed3DError(CmcError, ValueError):
    """The file is not a SAM-Med3D checkpoint whose image encoder fits this network."""


def _read(path: Path, trusted: bool) -> object:
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise SamMed3DError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise SamMed3DError(f"{path}: not a torch checkpoint file")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it holds a {detail.group(1)} object" if detail else "unsafe pickle content"
        raise SamMed3DError(f"{path}: refused to load ({what}); if you trust this file, load "
                            "it with trusted=True") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise SamMed3DError(f"{path}: cannot read as a torch file ({exc})") from exc


def encoder_state_from_checkpoint(path: Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The `image_encoder.*` tensors of a SAM-Med3D checkpoint, prefix stripped."""
    data = _read(path, trusted)
    if not isinstance(data, Mapping) or not isinstance(data.get("model_state_dict"), Mapping):
        kind = sorted(map(str, data))[:8] if isinstance(data, Mapping) else type(data).__name__
        raise SamMed3DError(f"{path}: not a SAM-Med3D checkpoint (expected a dict with "
                            f"'model_state_dict', found {kind})")
    state = data["model_state_dict"]
    encoder: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            if not isinstance(value, torch.Tensor):
                raise SamMed3DError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
            encoder[key[len(ENCODER_PREFIX):]] = value
        elif not key.startswith(IGNORED_PREFIXES):
            foreign.append(key)
    if foreign:
        raise SamMed3DError(f"{path}: unexpected keys outside image_encoder/prompt_encoder/"
                            f"mask_decoder: {_names(foreign)}")
    if not encoder:
        raise SamMed3DError(f"{path}: model_state_dict has no '{ENCODER_PREFIX}*' tensors")
    return encoder


def _names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_encoder_state(path: Path, encoder: ImageEncoderViT3D,
                        state: Mapping[str, torch.Tensor]) -> None:
    """Strict comparison of checkpoint tensors with the encoder's SAM-layout parameters."""
    expected = {k: v for k, v in encoder.state_dict().items() if ADAPTER_MARK not in k}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} (file {list(state[k].shape)}, network {list(expected[k].shape)})"
                        for k in set(state) & set(expected)
                        if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if keys]
    if problems:
        raise SamMed3DError(f"{path}: image encoder does not fit the network; "
                            + "; ".join(problems))


def load_sam_med3d_encoder(net: CMCNet, path: str | Path, trusted: bool = False) -> int:
    """Load SAM-Med3D encoder weights into both encoders of `net`, then freeze patch
    embedding, pos_embed and attention. Returns the number of tensors loaded per encoder.

    `trusted=True` allows full unpickling (arbitrary code) for checkpoints holding objects
    the safe loader refuses; only use it for files from a trusted source.
    Raises SamMed3DError naming the file and the offending keys on any mismatch.
    """
    path = Path(path)
    state = encoder_state_from_checkpoint(path, trusted)
    for encoder in (net.encoder_a, net.encoder_b):
        check_encoder_state(path, encoder, state)
    for encoder in (net.encoder_a, net.encoder_b):
        result = encoder.load_state_dict(state, strict=False)
        # check_encoder_state guarantees these; a failure here is a bug, not bad input.
        assert not result.unexpected_keys
        assert all(ADAPTER_MARK in k for k in result.missing_keys)
        for _, param in encoder.pretrained_frozen_parameters():
            param.requires_grad_(False)
    return len(state)

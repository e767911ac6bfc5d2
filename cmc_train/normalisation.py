"""Intensity normalisation per modality: named presets, the text form `--set` takes, and the
one-line description `cmc train` prints before the first step.

Pure Python (no torch). The chosen settings travel in `PreprocessConfig.normalisation` (a
dict per modality name), hence in every checkpoint and in the exported `cmc.json`, where
`cmc_serve.preprocess` applies the same arithmetic. Kinds (the dict's "kind"):

- `ct_window` {low, high}: clip to [low, high] (HU), scale linearly to [0, 1];
- `zscore_nonzero`: (x - mean) / std over the non-zero voxels, zeros stay 0;
- `percentile_zscore` {lower, upper}: the non-zero voxels clipped to their own `lower` and
  `upper` percentiles (linear interpolation), then z-scored over the non-zero voxels; zeros
  stay 0. Robust to the bright outliers of MR (vessels, fat, coil hot spots).

Without a choice, a modality named "ct" (any case) gets `ct-abdomen` (the paper's window)
and any other modality `zscore`: the behaviour of every checkpoint written before the
choice existed, so they load and serve unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cmc_train.errors import ConfigError

KINDS = ("ct_window", "zscore_nonzero", "percentile_zscore")

PRESETS: dict[str, dict[str, Any]] = {
    # The CMC paper's abdominal window (soft tissue, contrast-enhanced organs).
    "ct-abdomen": {"kind": "ct_window", "low": -175.0, "high": 250.0},
    # The usual brain window (level 40, width 80 HU): grey / white matter and CSF.
    "ct-brain": {"kind": "ct_window", "low": 0.0, "high": 80.0},
    "zscore": {"kind": "zscore_nonzero"},
    "percentile": {"kind": "percentile_zscore", "lower": 0.5, "upper": 99.5},
}

SYNTAX = ("ct-abdomen | ct-brain | zscore | percentile (0.5-99.5 clip, then z-score) | "
          "window:LOW:HIGH | percentile:LOWER:UPPER")


def default_normalisation(modality: str) -> dict[str, Any]:
    """CT gets the abdominal window of the paper; every other modality a non-zero z-score."""
    return dict(PRESETS["ct-abdomen" if modality.lower() == "ct" else "zscore"])


def parse_normalisation(text: str) -> dict[str, Any]:
    """A preset name or `window:LOW:HIGH` / `percentile:LOWER:UPPER` -> the settings dict."""
    name, _, args = text.strip().partition(":")
    if not args and name in PRESETS:
        return dict(PRESETS[name])
    try:
        low, high = (float(v) for v in args.split(":"))
    except ValueError:
        raise ConfigError(f"{text!r} is not a normalisation; use {SYNTAX}") from None
    if name == "window":
        return checked({"kind": "ct_window", "low": low, "high": high})
    if name == "percentile":
        return checked({"kind": "percentile_zscore", "lower": low, "upper": high})
    raise ConfigError(f"{text!r} is not a normalisation; use {SYNTAX}")


def checked(norm: Mapping[str, Any]) -> dict[str, Any]:
    """`norm` if it is a valid settings dict (numbers made floats), else ValueError."""
    kind = norm.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"unknown normalisation {dict(norm)!r} (kinds: {', '.join(KINDS)})")
    out = dict(norm)
    bounds = {"ct_window": ("low", "high"), "percentile_zscore": ("lower", "upper")}.get(kind)
    if bounds:
        try:
            low, high = float(norm[bounds[0]]), float(norm[bounds[1]])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{kind} needs numbers {bounds[0]} and {bounds[1]}, got "
                              f"{dict(norm)!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{kind} needs {bounds[0]} < {bounds[1]}, got {low} and {high}")
        if kind == "percentile_zscore" and not (0.0 <= low and high <= 100.0):
            raise ConfigError(f"percentiles must lie in [0, 100], got {low} and {high}")
        out[bounds[0]], out[bounds[1]] = low, high
    return out


def describe(norm: Mapping[str, Any]) -> str:
    """`norm` in words, with its preset name where it is one (printed by `cmc train`)."""
    preset = next((name for name, p in PRESETS.items() if p == dict(norm)), None)
    kind = norm["kind"]
    if kind == "ct_window":
        words = f"window {norm['low']:g}..{norm['high']:g} HU scaled to [0, 1]"
    elif kind == "percentile_zscore":
        words = (f"non-zero voxels clipped to their {norm['lower']:g}-{norm['upper']:g} "
                 "percentiles, then z-score over non-zero voxels")
    else:
        words = "z-score over non-zero voxels"
    return f"{preset} ({words})" if preset else words

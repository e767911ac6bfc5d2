"""`KEY=VALUE` changes to a run configuration: the one parser behind `cmc train --set` and
`bench/quality.py --train`.

A KEY names a field of the run config's `train`, `preprocess` or `model` section, with or
without the section (`lr` = `train.lr`, `spacing` = `preprocess.spacing`); nested settings
take dots (`normalisation.mr`). A VALUE is read as the field's type: numbers, booleans
(true/false, yes/no, 1/0), comma lists (`spacing=1.5,1.5,3`, one number = isotropic), and
for `normalisation.MODALITY` a preset or form of `cmc_train.normalisation`. The datalist
fixes the classes and modalities, so `num_classes`, `modalities` and `orientation` (RAS
only) are not settable; `num_workers` is not either (the step-indexed sampler loads no
data in workers).

Pure Python (no torch): the CLI parses settings before loading anything heavy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from cmc_common.errors import CmcError
from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.normalisation import parse_normalisation

SECTIONS: dict[str, type] = {"train": TrainConfig, "preprocess": PreprocessConfig,
                             "model": ModelConfig}
NOT_SETTABLE = ("model.num_classes", "preprocess.modalities", "preprocess.orientation",
                "train.num_workers")
NORMALISATION = "preprocess.normalisation"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class SettingError(CmcError, ValueError):
    """A KEY=VALUE that names no setting or does not parse (the message quotes it)."""


def setting_keys() -> list[str]:
    """Every settable key in its short form, as `--help` lists them."""
    keys = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            full = f"{section}.{f.name}"
            if full in NOT_SETTABLE:
                continue
            keys.append("normalisation.MODALITY" if full == NORMALISATION else f.name)
    return keys


def _resolve(key: str) -> tuple[str, str, str | None]:
    """(section, field, modality or None) of a key in short or long form."""
    parts = key.split(".")
    if parts[0] in SECTIONS:
        section, rest = parts[0], parts[1:]
    else:
        matches = [s for s, cls in SECTIONS.items()
                   if any(f.name == parts[0] for f in dataclasses.fields(cls))]
        section, rest = (matches[0], parts) if matches else ("", parts)
    names = {f.name for f in dataclasses.fields(SECTIONS[section])} if section else set()
    if not rest or rest[0] not in names or f"{section}.{rest[0]}" in NOT_SETTABLE:
        raise SettingError(f"unknown setting {key!r}; settable: {', '.join(setting_keys())}")
    nested = f"{section}.{rest[0]}" == NORMALISATION
    if nested != (len(rest) == 2) or len(rest) > 2:
        raise SettingError(f"{key!r}: use normalisation.MODALITY for the normalisation and a "
                           "plain name for every other setting")
    return section, rest[0], rest[1] if nested else None


def _typed(text: str, default: Any, field_name: str) -> Any:
    """`text` read as the type of the field's default value."""
    if isinstance(default, bool):
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() in _TRUE
    if isinstance(default, tuple):
        item = float if field_name == "spacing" else int
        try:
            values = tuple(item(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a comma list of {item.__name__}s") from None
        if field_name == "spacing" and len(values) == 1:
            values *= 3
        if field_name == "spacing" and (len(values) != 3 or min(values) <= 0):
            raise ValueError(f"{text!r} is not 3 positive spacings (mm) or one")
        return values
    kind = type(default)
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an' if kind is int else 'a'} "
                         f"{kind.__name__}") from None


def parse_settings(pairs: Sequence[str], fixed: Collection[str] = ()) -> dict[str, Any]:
    """KEY=VALUE texts -> {"section.field[.modality]": typed value}; `fixed` names fields
    (short or long form) the caller sets itself and refuses here."""
    defaults = {name: cls() for name, cls in SECTIONS.items()}
    refused = {_resolve(k)[:2] for k in fixed}
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SettingError(f"{pair!r}: expected KEY=VALUE")
        section, name, modality = _resolve(key.strip())
        if (section, name) in refused:
            raise SettingError(f"{pair!r}: {name} is set by this command, not by KEY=VALUE")
        try:
            if modality is not None:
                value: Any = parse_normalisation(text)
            else:
                value = _typed(text.strip(), getattr(defaults[section], name), name)
        except ValueError as exc:
            raise SettingError(f"{pair!r}: {exc}") from None
        settings[".".join(p for p in (section, name, modality) if p)] = value
    return settings


def apply_settings(run_cfg: RunConfig, settings: Mapping[str, Any]) -> RunConfig:
    """`run_cfg` with the parsed settings; each section re-validates itself."""
    changes: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    norms = {m: dict(v) for m, v in run_cfg.preprocess.normalisation.items()}
    for key, value in settings.items():
        section, name, *modality = key.split(".")
        if modality:
            if modality[0] not in run_cfg.preprocess.modalities:
                raise SettingError(f"{key}: no modality {modality[0]!r} in this run "
                                   f"(modalities: {list(run_cfg.preprocess.modalities)})")
            norms[modality[0]] = value
            changes[section][name] = norms
        else:
            changes[section][name] = value
    try:
        return dataclasses.replace(run_cfg, **{
            name: dataclasses.replace(getattr(run_cfg, name), **fields)
            for name, fields in changes.items() if fields})
    except (TypeError, ValueError) as exc:
        raise SettingError(f"{', '.join(settings)}: {exc}") from None

"""Which series of a study is modality a and which is modality b.

Feeding the two channels in the wrong order gives a plausible-looking but wrong segmentation
(nnU-Net #736, #2201), so the choice is made by explicit rules and every decision is returned
as a sentence that the pipeline logs and stores in the report:

- a series is a candidate for a role when its DICOM Modality tag is one the role accepts
  (by default derived from the model's modality names in cmc.json: "ct" -> CT, "mr" -> MR,
  ...), its SeriesDescription matches the role's `description` regex (if any) and does not
  match `exclude` (by default localizers, scouts and topograms);
- when several series qualify, the one with the most slices wins (ties: lowest
  SeriesNumber, then UID), and the losers are named in the log;
- when both roles accept the same DICOM modality (two MR sequences, for example) and no
  description rule tells them apart, the study is ambiguous and rejected: guessing is what
  this module exists to prevent. A `--pairing rules.yaml` file resolves it.

Rules file (keys are the roles `a`/`b` or the model's modality names):

    a:
      modality: [MR]
      description: "(?i)t1(?!c)"
    b:
      modality: MR
      description: "(?i)t1c|post.?contrast"
      exclude: "(?i)localizer|subtraction"
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cmc_common.contract import ROLES
from cmc_serve.errors import SegmentError

DEFAULT_EXCLUDE = r"(?i)localizer|localiser|scout|topogram|survey|pilot|surview|scanogram"

# Model modality names (cmc.json "modalities") -> DICOM Modality tag values.
_DICOM_MODALITY = {
    "ct": "CT", "cect": "CT", "ncct": "CT",
    "mr": "MR", "mri": "MR", "t1": "MR", "t1c": "MR", "t1ce": "MR", "t2": "MR", "flair": "MR",
    "bssfp": "MR", "lge": "MR", "t2w": "MR", "t1w": "MR", "dwi": "MR", "adc": "MR",
    "pet": "PT", "pt": "PT", "us": "US", "xa": "XA",
}


class PairingError(SegmentError, ValueError):
    """No valid or an ambiguous assignment of series to modalities a/b."""


@dataclass(frozen=True)
class SeriesSummary:
    """What pairing needs to know about one series (decoupled from the DICOM reader)."""

    uid: str
    modality: str
    description: str
    number: int | None
    num_slices: int

    def label(self) -> str:
        number = "?" if self.number is None else str(self.number)
        return (f"series {number} '{self.description}' [{self.modality}, "
                f"{self.num_slices} files, ...{self.uid[-12:]}]")


@dataclass(frozen=True)
class RoleRule:
    """Selection rule for one role (a or b)."""

    modalities: tuple[str, ...]
    description: re.Pattern[str] | None = None
    exclude: re.Pattern[str] | None = re.compile(DEFAULT_EXCLUDE)

    def accepts(self, s: SeriesSummary) -> bool:
        if s.modality.upper() not in self.modalities:
            return False
        if self.description is not None and not self.description.search(s.description):
            return False
        return not (self.exclude is not None and self.exclude.search(s.description))

    def explain(self) -> str:
        parts = [f"Modality in {list(self.modalities)}"]
        if self.description is not None:
            parts.append(f"description ~ /{self.description.pattern}/")
        if self.exclude is not None:
            parts.append("not a localizer" if self.exclude.pattern == DEFAULT_EXCLUDE
                         else f"description !~ /{self.exclude.pattern}/")
        return ", ".join(parts)


@dataclass(frozen=True)
class PairingRules:
    """Rules for both roles, plus the model's modality names for messages."""

    names: tuple[str, str]
    a: RoleRule
    b: RoleRule

    def rule(self, role: str) -> RoleRule:
        return self.a if role == "a" else self.b

    @property
    def ambiguous(self) -> bool:
        """Both roles accept the same DICOM modality and nothing else separates them."""
        shared = set(self.a.modalities) & set(self.b.modalities)
        return bool(shared) and self.a.description is None and self.b.description is None

    @classmethod
    def default(cls, names: Sequence[str]) -> PairingRules:
        """Rules derived from the model's modality names alone."""
        a, b = (dicom_modality(n) for n in names[:2])
        return cls((names[0], names[1]), RoleRule((a,)), RoleRule((b,)))

    @classmethod
    def from_yaml(cls, path: Path, names: Sequence[str]) -> PairingRules:
        """Defaults overridden by a rules file; unknown keys and bad regexes are errors."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PairingError(f"{path}: cannot read pairing rules ({exc})") from exc
        if not isinstance(data, dict):
            raise PairingError(f"{path}: pairing rules must be a mapping of a/b to rules")
        base = cls.default(names)
        rules = {"a": base.a, "b": base.b}
        aliases = {"a": "a", "b": "b", names[0]: "a", names[1]: "b"}
        for key, spec in data.items():
            if key not in aliases:
                raise PairingError(f"{path}: unknown role {key!r} (use a, b, {names[0]} or "
                                   f"{names[1]})")
            role = aliases[key]
            rules[role] = _parse_rule(path, key, spec, rules[role])
        return cls((names[0], names[1]), rules["a"], rules["b"])


def dicom_modality(name: str) -> str:
    """DICOM Modality tag value for a model modality name ("ct" -> "CT", "t1c" -> "MR")."""
    return _DICOM_MODALITY.get(name.lower(), name.upper())


def _regex(path: Path, key: str, field: str, value: Any) -> re.Pattern[str] | None:
    if value is None:
        return None
    try:
        return re.compile(str(value))
    except re.error as exc:
        raise PairingError(f"{path}: {key}.{field}: bad regular expression ({exc})") from exc


def _parse_rule(path: Path, key: str, spec: Any, base: RoleRule) -> RoleRule:
    if not isinstance(spec, dict):
        raise PairingError(f"{path}: rule for {key!r} must be a mapping")
    unknown = set(spec) - {"modality", "description", "exclude"}
    if unknown:
        raise PairingError(f"{path}: {key}: unknown fields {sorted(unknown)} "
                           "(modality, description, exclude)")
    modality = spec.get("modality", list(base.modalities))
    mods = (modality,) if isinstance(modality, str) else tuple(modality)
    return RoleRule(tuple(str(m).upper() for m in mods),
                    _regex(path, key, "description", spec.get("description")),
                    _regex(path, key, "exclude", spec.get("exclude", base.exclude.pattern
                                                       if base.exclude else None)))


@dataclass(frozen=True)
class Pairing:
    """The series chosen for each role (None: absent) and why."""

    a: SeriesSummary | None
    b: SeriesSummary | None
    reasons: tuple[str, ...]


def _pick(role: str, rules: PairingRules, series: Sequence[SeriesSummary],
          reasons: list[str]) -> SeriesSummary | None:
    rule = rules.rule(role)
    name = rules.names[ROLES.index(role)]
    candidates = [s for s in series if rule.accepts(s)]
    if not candidates:
        reasons.append(f"{role} ({name}): no series matches ({rule.explain()})")
        return None
    ranked = sorted(candidates, key=lambda s: (-s.num_slices,
                                               s.number if s.number is not None else 1 << 30,
                                               s.uid))
    chosen = ranked[0]
    why = f"{role} ({name}) <- {chosen.label()}: {rule.explain()}"
    if len(ranked) > 1:
        why += "; most slices among " + ", ".join(s.label() for s in ranked[1:])
    reasons.append(why)
    return chosen


def pair_series(series: Sequence[SeriesSummary], rules: PairingRules,
                roles: Sequence[str] = ROLES, where: str = "study") -> Pairing:
    """Assign series to the requested roles; raise PairingError when it would be a guess."""
    needs_both = "a" in roles and "b" in roles
    if needs_both and rules.ambiguous:
        shared = sorted(set(rules.a.modalities) & set(rules.b.modalities))
        if sum(1 for s in series if rules.a.accepts(s)) > 1:
            raise PairingError(
                f"{where}: cannot tell {rules.names[0]} (a) from {rules.names[1]} (b): both are "
                f"{'/'.join(shared)} series; give a --pairing rules file with description "
                "regexes")
    reasons: list[str] = []
    a = _pick("a", rules, series, reasons) if "a" in roles else None
    b = _pick("b", rules, series, reasons) if "b" in roles else None
    if a is not None and b is not None and a.uid == b.uid:
        raise PairingError(f"{where}: the same {a.label()} matches both a and b; "
                           "give a --pairing rules file that separates them")
    return Pairing(a, b, tuple(reasons))

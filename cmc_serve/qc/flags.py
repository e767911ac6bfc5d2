"""The records quality control reports in: one `QcFlag` per finding, one `CaseQc` per case.

Every signal (the fused pass's two branches, the cross-modal opinion, the input fingerprint
against the training images, the anatomy against the training labels) reports what it found
as flags with their numbers and a plain sentence, so that report.json, statistics.json, the
case's `done` record, report.html, the node's status page and the DICOM descriptions all say
the same thing in the same words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# DICOM LO (SeriesDescription, ContentDescription) holds at most 64 characters.
DICOM_LO_MAX = 64
REVIEW_PREFIX = "needs review: "


def score_text(score: float) -> str:
    """A score as people read it: two decimals, rounded down, so that an answer the verdict
    put below 0.5 never shows as "0.50", the score of an unflagged case at its floor."""
    return f"{math.floor(score * 100 + 1e-9) / 100:.2f}"


def value_range(low: float, high: float) -> str:
    """A training range as a message writes it, whole numbers: "140-260", but "-757 to -420"
    where a bound is negative (a CT's HU), which a hyphen would make unreadable."""
    if min(low, high) < 0:
        return f"{low:.0f} to {high:.0f}"
    return f"{low:.0f}-{high:.0f}"


@dataclass(frozen=True)
class QcFlag:
    """One reason to doubt a case.

    `code` is a stable identifier a program may act on (e.g. "branch_disagreement",
    "intensity_out_of_range", "modality_role", "fov_cut"); `message` the plain sentence a
    person reads, numbers included (e.g. "b: intensity p50 812, training 140-260");
    `structure` the class name it concerns (None: the whole case); `role` the input it
    concerns ("a" / "b", None: both or the answer); `values` the numbers behind the message.
    """

    code: str
    message: str
    structure: str | None = None
    role: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.structure is not None:
            out["structure"] = self.structure
        if self.role is not None:
            out["role"] = self.role
        out["values"] = dict(self.values)
        return out


@dataclass(frozen=True)
class CaseQc:
    """The verdict on one case: `score` in [0, 1] (1: nothing found to doubt), `flagged`
    when a person should look before the answer is used, the `flags` that say why, a score
    per structure (class name -> [0, 1]) and the raw `signals` the verdict was made from."""

    score: float
    flagged: bool
    flags: tuple[QcFlag, ...] = ()
    structures: Mapping[str, float] = field(default_factory=dict)
    signals: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"score": round(float(self.score), 4), "flagged": self.flagged,
                "flags": [f.to_json() for f in self.flags],
                "structures": {k: round(float(v), 4) for k, v in self.structures.items()},
                "signals": dict(self.signals)}


def review_text(flags: Sequence[QcFlag], limit: int = DICOM_LO_MAX) -> str:
    """"needs review: <reasons>" cut to `limit` characters (a DICOM LO value): the codes of
    the flags in order, as many as fit, "+N" for those that do not."""
    codes = list(dict.fromkeys(f.code for f in flags))
    text = REVIEW_PREFIX + ", ".join(codes)
    if len(text) <= limit:
        return text
    for keep in range(len(codes) - 1, 0, -1):
        text = REVIEW_PREFIX + ", ".join(codes[:keep]) + f", +{len(codes) - keep}"
        if len(text) <= limit:
            return text
    return (REVIEW_PREFIX + codes[0])[:limit]

"""The one place that decides whether images may be segmented and combined, and on what terms.

Fusing two images resamples modality b into a's grid by *world position*. That is only
meaningful when both images belong to one patient and their world coordinates are the same
coordinate system; otherwise the result looks plausible and is wrong (a CT of one patient
fused with an MR of another, written under the first). Every entry point that combines two
images calls `check_combination`: `cmc segment` for folders, file pairs and the pairing rules
of a study (`cmc_serve.pipeline.run_case`), the Python API (`cmc_serve.pipeline.segment`,
`cmc_serve.engine.Segmenter.segment(..., identity_a=, identity_b=)`), the Triton path (a
`Segmenter`), and any future DICOM node. Its rules:

- different PatientID, or the same PatientID issued by different IssuerOfPatientID:
  different patients, refused; no option overrides it;
- different FrameOfReferenceUID: unrelated world coordinates, refused unless the user
  asserts the images are already registered (`Assumptions.registered`,
  `--assume-registered`);
- an image whose orientation the file does not state and the user supplied
  (`--assume-orientation`) has no trustworthy world position: combining it with another
  image also needs `--assume-registered`;
- what an image does not state (a NIfTI without a sidecar, a DICOM without the tag) cannot be
  checked; that is said in the case's notes, never passed over in silence.

`Assumptions` holds what the user asked us to take on trust; `Assumptions.record` turns what
each case relied on into the per-case entry of report.json, so no output hides one.
This module is pure Python (no numpy, no pydicom) so that any client can import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cmc_common.errors import CmcError
from cmc_serve.errors import SegmentOptionError

# Axis code letters per world axis (nibabel's convention: the direction in which the voxel
# index grows), e.g. "LPS" = i to the patient's left, j to posterior, k to superior.
_AXIS_LETTERS = ("LR", "PA", "IS")

# The options of `cmc segment` (report keys) that are assumptions the user takes on trust.
ASSUME_REGISTERED = "assume_registered"
ASSUME_ORIENTATION = "assume_orientation"
SKIP_UNREADABLE = "skip_unreadable"

# How an image's orientation is known.
ORIENTATION_FROM_FILE = "file"
ORIENTATION_ASSUMED = "assumed"


class CompatibilityError(CmcError, ValueError):
    """Two images that must not be combined, or an assumption that is not well formed;
    str() is one line naming the images and what would override the refusal, if anything."""


def parse_axis_codes(text: str) -> str:
    """'lps' -> 'LPS': three letters, one from each of L/R, P/A, I/S; else a SegmentOptionError
    naming `assume_orientation`, the one option (and read_nifti argument) they come from."""
    codes = text.strip().upper()
    axes = sorted(next((i for i, pair in enumerate(_AXIS_LETTERS) if c in pair), -1)
                  for c in codes)
    if len(codes) != 3 or axes != [0, 1, 2]:
        raise SegmentOptionError("assume_orientation", f"{text!r} is not three axis codes with "
                                 "one of L/R, P/A and I/S each (e.g. LPS, RAS)")
    return codes


@dataclass(frozen=True)
class Assumptions:
    """What the user asks us to take on trust; each one is recorded per case in the report.

    `registered`: images with different frames of reference (or a supplied orientation) are
    already aligned in world space. `orientation`: axis codes for images whose file states no
    orientation (NIfTI with qform_code = sform_code = 0); a stated orientation is never
    overridden. `skip_unreadable`: a DICOM series is segmented without its unreadable files.
    """

    registered: bool = False
    orientation: str | None = None
    skip_unreadable: bool = False

    def __post_init__(self) -> None:
        if self.orientation is not None:
            object.__setattr__(self, "orientation", parse_axis_codes(self.orientation))

    def asked(self) -> tuple[str, ...]:
        """The report keys of the assumptions asked for."""
        return tuple(key for key, on in ((ASSUME_REGISTERED, self.registered),
                                         (ASSUME_ORIENTATION, self.orientation is not None),
                                         (SKIP_UNREADABLE, self.skip_unreadable)) if on)

    def record(self, applied: Mapping[str, Sequence[str]]) -> dict[str, str]:
        """Per case: every assumption asked for, with what it covered in this case."""
        return {key: "; ".join(applied.get(key, ())) or "asked for; this case did not need it"
                for key in self.asked()}


@dataclass(frozen=True)
class ImageFacts:
    """What an image states about whose it is and where it lies (None: not stated).

    `source` names the image in messages. `orientation` is ORIENTATION_FROM_FILE, or
    ORIENTATION_ASSUMED when `Assumptions.orientation` supplied it.
    """

    source: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    frame_of_reference_uid: str | None = None
    orientation: str = ORIENTATION_FROM_FILE

    @classmethod
    def from_tags(cls, source: str, tags: Mapping[str, Any] | Any) -> ImageFacts:
        """From DICOM keywords: attributes of a pydicom Dataset, or keys of a dict (a NIfTI's
        JSON sidecar); empty values count as not stated."""
        def get(keyword: str) -> str | None:
            value = tags.get(keyword) if isinstance(tags, Mapping) else getattr(tags, keyword,
                                                                                 None)
            text = "" if value is None else str(value).strip()
            return text or None

        return cls(source, get("PatientID"), get("IssuerOfPatientID"),
                   get("FrameOfReferenceUID"))

    def with_orientation(self, orientation: str) -> ImageFacts:
        """The same facts with the way the orientation is known replaced."""
        return replace(self, orientation=orientation)


@dataclass(frozen=True)
class Combination:
    """The verdict on a pair that may be combined: notes for the case, and what the
    registration assumption covered (None: not needed)."""

    notes: tuple[str, ...]
    registered_by_assumption: str | None


def _same_patient(a: ImageFacts, b: ImageFacts) -> None:
    if a.patient_id and b.patient_id and a.patient_id != b.patient_id:
        raise CompatibilityError(
            f"{a.source} (PatientID {a.patient_id!r}) and {b.source} (PatientID "
            f"{b.patient_id!r}) are different patients: refusing to combine them")
    if (a.patient_id and a.patient_id == b.patient_id and a.issuer_of_patient_id
            and b.issuer_of_patient_id and a.issuer_of_patient_id != b.issuer_of_patient_id):
        raise CompatibilityError(
            f"{a.source} and {b.source}: PatientID {a.patient_id!r} comes from different "
            f"issuers ({a.issuer_of_patient_id!r}, {b.issuer_of_patient_id!r}), so it does "
            "not identify one patient: refusing to combine them")


def _frame_problem(a: ImageFacts, b: ImageFacts) -> str | None:
    """Why world positions of a and b cannot be matched, or None when they can."""
    for x, y in ((a, b), (b, a)):
        if x.orientation == ORIENTATION_ASSUMED:
            return (f"{x.source} states no orientation (its axes were supplied by "
                    f"--assume-orientation), so its world position cannot be matched to "
                    f"{y.source}")
    fa, fb = a.frame_of_reference_uid, b.frame_of_reference_uid
    if fa and fb and fa != fb:
        return (f"{a.source} and {b.source} have different frames of reference ({fa} vs "
                f"{fb}): their world coordinates are unrelated, so b cannot be placed on a's "
                "grid by position")
    return None


def check_combination(a: ImageFacts, b: ImageFacts,
                      assumptions: Assumptions | None = None) -> Combination:
    """May `b` be resampled into `a`'s grid by world position and the two fused?

    Raises CompatibilityError (one line) when not; returns the notes a report should keep.
    """
    assumptions = assumptions or Assumptions()
    _same_patient(a, b)
    notes = [f"not checked against the other image: {x.source} does not state its "
             + " or ".join(tag for tag, value in (("PatientID", x.patient_id),
                                                 ("FrameOfReferenceUID",
                                                  x.frame_of_reference_uid)) if value is None)
             for x in (a, b) if x.patient_id is None or x.frame_of_reference_uid is None]
    problem = _frame_problem(a, b)
    if problem is None:
        return Combination(tuple(notes), None)
    if not assumptions.registered:
        raise CompatibilityError(f"{problem}; pass --assume-registered if they are already "
                                 "aligned in world space")
    return Combination(tuple(notes), f"{problem}; combined because the user asserted they "
                                     "are registered")

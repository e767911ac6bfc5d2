"""What every object cmc derives from a series (SEG, RTSTRUCT, SR) says about its origin.

One place decides, so the three objects of a case agree and a PACS user can tell them
apart in a series list:
- the algorithm: name "CMC <model name>", version = the serving cmc's version, and as
  parameters the model's checksum (cmc.json's `checkpoint_sha256`), the mode, runtime and
  precision that produced the labels;
- the mode in modality names ("CT+MR fused", "CT only", "MR only") in the series
  description, with quality control's "needs review: ..." when the case was flagged;
- a series number per object type and mode (SEG 300-302, RTSTRUCT 310-312, SR 320-322 for
  fused, a, b), so a CT-only and a fused result of one study never share a series number;
- the Type 2 patient and study attributes some anonymisers remove (absent, not empty):
  the standard allows them empty, so derived objects get them empty instead of failing, and
  `missing_type2` lets the case record say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cmc_common.contract import MODES
from cmc_serve import __version__

# DICOM LO (SeriesDescription, ContentDescription) holds at most 64 characters.
LO_MAX = 64
OBJECT_SERIES = {"seg": 300, "rtstruct": 310, "sr": 320}
OBJECT_WORDS = {"seg": "segmentation", "rtstruct": "contours", "sr": "measurements"}
# Type 2 attributes of the Patient and General Study modules that a derived object copies
# from its source: required to be present, allowed to be empty.
TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class Provenance:
    """Who made a derived object and how (see the module docstring).

    `modalities` are the model's names for roles a and b; `mode` one of fused, a, b (None:
    not known, e.g. a direct library call); `runtime` / `precision` as report.json's engine.
    """

    model_name: str = "cmc"
    model_sha256: str | None = None
    modalities: tuple[str, str] = ("a", "b")
    mode: str | None = None
    runtime: str | None = None
    precision: str | None = None
    cmc_version: str = __version__

    @property
    def mode_text(self) -> str:
        """The mode in modality names: "CT+MR fused", "CT only", "MR only" ("" unknown)."""
        a, b = (m.upper() for m in self.modalities)
        return {"fused": f"{a}+{b} fused", "a": f"{a} only", "b": f"{b} only"}.get(
            self.mode or "", "")

    def series_number(self, kind: str) -> int:
        return OBJECT_SERIES[kind] + (MODES.index(self.mode) if self.mode in MODES else 0)

    def series_description(self, kind: str, review: str | None = None) -> str:
        """"CMC segmentation, CT+MR fused" and, when flagged, the review reasons; the
        review alone when both do not fit 64 characters (the flag matters more)."""
        text = f"CMC {OBJECT_WORDS[kind]}" + (f", {self.mode_text}" if self.mode_text else "")
        if review is None:
            return text[:LO_MAX]
        with_mode = f"CMC {self.mode_text}, {review}" if self.mode_text else f"CMC, {review}"
        return with_mode if len(with_mode) <= LO_MAX else review[:LO_MAX]

    @property
    def algorithm_name(self) -> str:
        return f"CMC {self.model_name}"[:LO_MAX]

    def parameters(self) -> dict[str, str]:
        """The algorithm's parameters as written into the objects (values that are known)."""
        values = {"model_sha256": self.model_sha256, "mode": self.mode,
                  "modalities": "+".join(self.modalities), "runtime": self.runtime,
                  "precision": self.precision}
        return {k: v for k, v in values.items() if v}

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        """The SEG's segmentation algorithm identification."""
        return hd.AlgorithmIdentificationSequence(
            name=self.algorithm_name, family=codes.cid7162.ArtificialIntelligence,
            version=self.cmc_version, parameters=self.parameters() or None)

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        """The same identification as an SR content item (TID 4019)."""
        return hd.sr.AlgorithmIdentification(
            name=self.algorithm_name, version=self.cmc_version,
            parameters=[f"{k}={v}" for k, v in self.parameters().items()] or None)


def missing_type2(datasets: Sequence[Dataset]) -> list[str]:
    """The Type 2 patient/study attributes absent from the source (in TYPE2_ATTRIBUTES
    order); an attribute present but empty is not missing."""
    return [k for k in TYPE2_ATTRIBUTES if any(k not in ds for ds in datasets)]


def complete_type2(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The datasets with every absent Type 2 attribute added empty, as the standard allows;
    new datasets sharing the element values where one is added, so the caller's datasets are
    left as they were (pydicom's copy.copy and Dataset.copy share the element dict)."""
    missing = missing_type2(datasets)
    if not missing:
        return list(datasets)
    out = []
    for ds in datasets:
        filled = Dataset()
        filled.update(ds)
        if hasattr(ds, "file_meta"):
            filled.file_meta = ds.file_meta
        for keyword in missing:
            if keyword not in filled:
                setattr(filled, keyword, None)
        out.append(filled)
    return out


def type2_warning(name: str, missing: Sequence[str]) -> str:
    """The case record's line about attributes written empty."""
    return (f"{name}: the source series lacks the Type 2 attributes {', '.join(missing)}; "
            "written empty, as the standard allows")

"""One case from its inputs to labels on the source grid, in stages the batch runner overlaps.

`load_case` (threads: read + pre-process) -> `segment_case` (main thread: infer + labels back
to the source grid) -> `outputs.write_case_outputs`. A case that cannot go on raises a
one-line error the batch logs in failures.csv with the stage it stopped in (`failed_stage`):
this module's checks raise `CaseError` naming the stage, other cmc refusals arrive as
raised and are placed by their class, another library's exception becomes a CaseError.

Geometry rules (orientation/flip errors are the most reported bug class of such tools):
- two images are combined only when `cmc_serve.compatibility.check_combination` allows it
  (same patient, same frame of reference or the user's `--assume-registered`); every
  assumption the user asked for is recorded per case (`LoadedCase.assumptions`);
- modality b is resampled into modality a's *world* grid before any pre-processing, so both
  channels see the same anatomy voxel for voxel; the two are never paired by array index;
- labels come back to the reference image's own grid by nearest neighbour (uint8 labels,
  never per-class probabilities), and their shape must equal the input's.

Quality control (`qc`: "off" | "on" | "full", `QcLevel`) judges each case after
post-processing, on the model grid, from what segmenting produced: the fused pass's two
decoders (same graph calls), the images as read, and with "full" also the a-only and
b-only answers (two more passes, the cost of the cross-modal opinion). A flagged case is
not a failed one: its outputs are written and say so (`CaseResult.qc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cmc_common.contract import AUTO, MODES, ROLES, Mode, QcLevel
from cmc_common.errors import CmcError, one_line
from cmc_serve.compatibility import (
    ASSUME_ORIENTATION,
    ASSUME_REGISTERED,
    ORIENTATION_ASSUMED,
    SKIP_UNREADABLE,
    Assumptions,
    CompatibilityError,
    ImageFacts,
    check_combination,
)
from cmc_serve.model_dir import ModelInfo
from cmc_serve.pipeline import library_warnings
from cmc_serve.pipeline.cases import Case, Source
from cmc_serve.pipeline.pairing import PairingError, PairingRules, pair_series
from cmc_serve.pipeline.report import StageTimer
from cmc_serve.qc.flags import CaseQc
from cmc_serve.qc.inputs import RoleImage
from cmc_serve.volume import Volume

if TYPE_CHECKING:
    from pydicom import Dataset

    from cmc_serve.engine import Segmenter
    from cmc_serve.preprocess import PreparedVolume
    from cmc_serve.qc.inputs import BranchOutputs


class CaseError(CmcError):
    """A case that cannot be segmented; `stage` says where it stopped."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def failed_stage(exc: BaseException, running: str) -> str:
    """The stage a case's failure stopped in: a CaseError's own, "pair" for a refused pairing
    or combination of the images, "preprocess" for a refused pre-processing, otherwise the
    stage the caller was `running`."""
    from cmc_serve.preprocess import PreprocessError

    if isinstance(exc, CaseError):
        return exc.stage
    if isinstance(exc, (PairingError, CompatibilityError)):
        return "pair"
    return "preprocess" if isinstance(exc, PreprocessError) else running


@dataclass(frozen=True)
class Image:
    """One modality's image as read: the volume and, for DICOM, the series' datasets."""

    role: str
    modality: str
    source: Source
    volume: Volume
    facts: ImageFacts  # whose image and which world it states
    datasets: Sequence[Dataset] | None = None

    @property
    def orientation_stated(self) -> bool:
        return self.facts.orientation != ORIENTATION_ASSUMED


@dataclass
class LoadedCase:
    """A case ready for inference: prepared arrays on one grid plus what outputs need."""

    case: Case
    mode: str
    reference: Image  # the grid the labels are returned to (a, or b in mode b)
    prepared: dict[str, PreparedVolume]  # role -> its pre-processed volume
    on_reference: dict[str, np.ndarray]  # modality name -> raw intensities on the reference
    pairing: list[str]
    timer: StageTimer = field(default_factory=StageTimer)
    assumptions: dict[str, str] = field(default_factory=dict)  # Assumptions.record
    warnings: list[str] = field(default_factory=list)
    images: dict[str, RoleImage] = field(default_factory=dict)  # role -> image as read


@dataclass
class CaseResult:
    loaded: LoadedCase
    labels: np.ndarray  # uint8, on the reference image's source grid
    engine: dict[str, str]
    qc: CaseQc | None = None  # None with qc "off"


# --------------------------------------------------------------------------- roles & mode

def roles_for(mode: str) -> tuple[str, ...]:
    """Roles an inference mode reads; `auto` reads whatever is present."""
    return ROLES if mode in (AUTO, Mode.FUSED) else (mode,)


def assign_roles(case: Case, rules: PairingRules,
                 roles: Sequence[str]) -> tuple[dict[str, Source], list[str]]:
    """Choose the source of each wanted role and say why (user-fixed roles first, then the
    DICOM pairing rules for the study's series)."""
    chosen: dict[str, Source] = {}
    reasons: list[str] = []
    free = [s for s in case.sources if s.role is None]
    for role in roles:
        fixed = [s for s in case.sources if s.role == role]
        name = rules.names[ROLES.index(role)]
        if not fixed:
            continue
        if fixed[0].kind == "nifti":
            if len(fixed) > 1:
                raise PairingError(f"{case.case_id}: {len(fixed)} images given as {role} ({name})")
            chosen[role] = fixed[0]
            reasons.append(f"{role} ({name}) <- {fixed[0].path}: given as {role} "
                           "(position or _000x channel suffix); NIfTI has no modality tag")
            continue
        pick = pair_series([s.summary for s in fixed if s.summary], rules, (role,),
                           where=str(fixed[0].path))
        series = pick.a if role == Mode.A else pick.b
        if series is None:  # e.g. the MR folder given first: say what it holds instead
            why = "; ".join(r.removeprefix(f"{role} ({name}): ") for r in pick.reasons)
            held = ", ".join(s.summary.label() for s in fixed if s.summary)
            slot = "INPUT" if role == Mode.A else "INPUT_B"
            raise PairingError(f"{fixed[0].path}: given as {role} ({name}) but {why}; it holds "
                               f"{held or 'no usable series'}: give the {name} series as "
                               f"{slot}")
        chosen[role] = next(s for s in fixed if s.summary == series)
        reasons.extend(pick.reasons)
    rest = [r for r in roles if r not in chosen]
    if free and rest:
        pick = pair_series([s.summary for s in free if s.summary], rules, rest,
                           where=f"study {case.case_id}")
        for role, series in zip(ROLES, (pick.a, pick.b), strict=True):
            if series is not None and role in rest:
                chosen[role] = next(s for s in free if s.summary == series)
        reasons.extend(pick.reasons)
    return chosen, reasons


def resolve_mode(requested: str, present: Sequence[str], info: ModelInfo, where: str) -> str:
    """The inference mode for the roles present; never a silent downgrade of an explicit
    request (`--mode fused` with b absent is an error, `auto` picks what the data allows)."""
    names = dict(zip(ROLES, info.modalities, strict=True))
    if requested == AUTO:
        options = [m for m in MODES
                   if all(r in present for r in roles_for(m)) and m in info.modes]
        if not options:
            have = ", ".join(f"{r} ({names[r]})" for r in present) or "no image"
            raise CaseError("pair", f"{where}: found {have}; the model serves modes "
                                    f"{list(info.modes)}")
        return options[0]
    missing = [r for r in roles_for(requested) if r not in present]
    if missing:
        r = missing[0]
        raise CaseError("pair", f"{where}: modality {r} ({names[r]}) required by --mode "
                                f"{requested} but absent")
    if requested not in info.modes:
        raise CaseError("pair", f"{where}: the model has no graph for mode {requested} "
                                f"(it serves {list(info.modes)})")
    return requested


# --------------------------------------------------------------------------- read

@dataclass
class _Provenance:
    """What reading a case's images relied on: assumptions applied, geometry warnings."""

    applied: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def apply(self, key: str, what: str) -> None:
        self.applied.setdefault(key, []).append(what)


def _read(role: str, modality: str, source: Source, assumptions: Assumptions,
          provenance: _Provenance) -> Image:
    """Read one image with the facts it states about itself (identity, orientation)."""
    label = f"{role} ({modality}) {source.describe()}"
    if source.kind == "nifti":
        from cmc_serve.nifti_io import load_nifti, read_identity

        image = load_nifti(source.path, assumptions.orientation)
        facts = ImageFacts.from_tags(label, read_identity(source.path))
        provenance.warnings.extend(image.warnings)
        if not image.orientation_stated:
            facts = facts.with_orientation(ORIENTATION_ASSUMED)
            provenance.apply(ASSUME_ORIENTATION, f"{source.path}: the header states no "
                             f"orientation (qform_code = sform_code = 0); read as "
                             f"{assumptions.orientation}, origin at the volume centre")
        return Image(role, modality, source, image.volume, facts)
    from cmc_serve.dicom.series import load_series

    loaded = load_series(source.series, assumptions.skip_unreadable)
    if loaded.skipped:
        provenance.apply(SKIP_UNREADABLE, f"{loaded.info.folder}: segmented without "
                         f"{len(loaded.skipped)} unreadable file(s): "
                         + ", ".join(f"{p.name} ({why})" for p, why in loaded.skipped))
    return Image(role, modality, source, loaded.volume,
                 ImageFacts.from_tags(label, loaded.datasets[0]), loaded.datasets)


def _check_image(volume: Volume, source: Source) -> None:
    """Refuse images that would give silently meaningless output."""
    array = volume.array
    if not np.all(np.isfinite(array)):
        raise CaseError("read", f"{source.describe()}: image contains NaN or infinite values")
    if not np.any(array):
        raise CaseError("read", f"{source.describe()}: image is all zeros")
    if float(array.min()) == float(array.max()):
        raise CaseError("read", f"{source.describe()}: image has a single intensity value")


# --------------------------------------------------------------------------- stages

def pair_case(case: Case, info: ModelInfo, rules: PairingRules,
              requested_mode: str) -> tuple[dict[str, Source], list[str], str]:
    """(source per role, reasons, mode) of a case from its headers alone (no pixel data),
    so a run can also learn up front which modes' graphs it will need."""
    if not case.sources:
        raise CaseError("pair", f"{case.case_id}: no series that can be segmented ("
                        + "; ".join(case.notes) + ")")
    chosen, reasons = assign_roles(case, rules, roles_for(requested_mode))
    mode = resolve_mode(requested_mode, [r for r in ROLES if r in chosen], info, case.case_id)
    return chosen, reasons, mode


def planned_modes(cases: Sequence[Case], info: ModelInfo, rules: PairingRules,
                  requested_mode: str) -> list[str]:
    """The inference modes the cases will run in (canonical order); a case that cannot be
    paired is left out here and fails on its own when it runs."""
    modes = set()
    for case in cases:
        try:
            modes.add(pair_case(case, info, rules, requested_mode)[2])
        except (CaseError, PairingError):
            continue
    return [m for m in MODES if m in modes]


def load_case(case: Case, info: ModelInfo, rules: PairingRules, requested_mode: str,
              assumptions: Assumptions | None = None) -> LoadedCase:
    """Pair, read, check and pre-process a case (safe to run in a worker thread)."""
    from cmc_serve.preprocess import preprocess, resample_to_reference

    timer = StageTimer()
    chosen, reasons, mode = pair_case(case, info, rules, requested_mode)
    roles = roles_for(mode)
    names = dict(zip(ROLES, info.modalities, strict=True))
    assumptions = assumptions or Assumptions()
    provenance = _Provenance()
    images: dict[str, Image] = {}
    with timer.stage("read"):
        for role in roles:
            src = chosen[role]
            try:
                with library_warnings.collected(src.describe(), reasons):
                    images[role] = _read(role, names[role], src, assumptions, provenance)
            except CmcError:
                raise  # each reader's own one-line refusal
            except Exception as exc:  # a library's exception the readers did not foresee
                raise CaseError("read", one_line(exc)) from exc
            _check_image(images[role].volume, src)
    if len(roles) == 2:
        combination = check_combination(images["a"].facts, images["b"].facts, assumptions)
        reasons.extend(combination.notes)
        if combination.registered_by_assumption:
            provenance.apply(ASSUME_REGISTERED, combination.registered_by_assumption)
    reference = images[roles[0]]
    on_reference = {reference.modality: reference.volume.array}
    prepared: dict[str, PreparedVolume] = {}
    with timer.stage("preprocess"):
        for role in roles:
            volume = images[role].volume
            if role != reference.role:
                if not volume.grid.same_as(reference.volume.grid):
                    volume = resample_to_reference(volume, reference.volume.grid)
                    reasons.append(f"{role} ({names[role]}) resampled into "
                                   f"{reference.role}'s world grid "
                                   f"{list(reference.volume.shape)} before pre-processing")
                on_reference[names[role]] = volume.array
            prepared[role] = preprocess(volume, names[role], info.preprocessing)
    return LoadedCase(case, mode, reference, prepared, on_reference, reasons, timer,
                      assumptions.record(provenance.applied), provenance.warnings,
                      {role: RoleImage(image.modality, image.volume.array, image.volume.affine)
                       for role, image in images.items()})


def segment_case(loaded: LoadedCase, segmenter: Segmenter, qc: str = QcLevel.ON) -> CaseResult:
    """Infer on the prepared grid, then return uint8 labels to the reference's source grid;
    with `qc` other than "off", judge the answer (module docstring)."""
    from cmc_serve import postprocess
    from cmc_serve.preprocess import labels_to_source

    timer = loaded.timer
    prep = loaded.prepared
    with timer.stage("infer"):
        try:
            result = segmenter.segment(
                prep["a"].array if "a" in prep else None,
                prep["b"].array if "b" in prep else None, loaded.mode,
                branches=qc != QcLevel.OFF)
        except CmcError:  # the engine's refusal of this input, or of the runtime or model
            raise  # (RuntimeUnavailable, ModelFileError: the batch stops the run)
        except Exception as exc:
            raise CaseError("infer", f"{loaded.case.case_id}: {one_line(exc)}") from exc
    with timer.stage("postprocess"):
        ref = loaded.reference
        cleaned = postprocess.apply(result.labels, segmenter.model.postprocessing, loaded.mode)
        labels = labels_to_source(cleaned, prep[ref.role], ref.volume)
        if labels.shape != ref.volume.shape:
            raise CaseError("postprocess", f"{loaded.case.case_id}: labels {labels.shape} do "
                                           f"not match the input shape {ref.volume.shape}")
    verdict = None
    if qc != QcLevel.OFF:
        with timer.stage("qc"):
            verdict = assess_quality(loaded, segmenter, cleaned, result.branches, qc)
    # Nothing after this stage reads the prepared volumes or QC's images: the outputs are
    # written with them released (float32 model grids and, in mode fused, b's raw volume).
    loaded.prepared, loaded.images = {}, {}
    engine = {k: str(getattr(result, k))
              for k in ("runtime", "device", "precision", "precision_reason")
              if getattr(result, k, None) is not None}
    return CaseResult(loaded, labels, engine, verdict)


def assess_quality(loaded: LoadedCase, segmenter: Segmenter, labels: np.ndarray,
                   branches: BranchOutputs | None, qc: str) -> CaseQc:
    """The verdict on one case from its model-grid `labels` (after post-processing), the
    fused pass's `branches` and, with qc "full", the single-modality answers; signals that
    could not be had are named in `signals` as unavailable, never filled in."""
    from dataclasses import replace

    from cmc_serve.qc.inputs import QcInputs
    from cmc_serve.qc.verdict import assess_case

    info = segmenter.model
    prep = loaded.prepared
    unavailable: dict[str, str] = {}
    if loaded.mode == Mode.FUSED and branches is None:
        unavailable["branches"] = ("unavailable: the fused graph returns no branch outputs "
                                   "(exported before them, or a Triton repository that "
                                   "does not declare them)")
    single: dict[str, np.ndarray] = {}
    if qc == QcLevel.FULL and loaded.mode == Mode.FUSED:
        missing = [role for role in ROLES if role not in info.modes]
        if missing:
            unavailable["cross_modal"] = (f"unavailable: the model has no graph for mode "
                                          f"{', '.join(missing)}")
        else:
            single = {role: _single_modality(prep, segmenter, role) for role in ROLES}
    inputs = QcInputs(class_names=tuple(info.classes), mode=loaded.mode, labels=labels,
                      affine=prep[loaded.reference.role].affine, images=loaded.images,
                      branches=branches, single_modality=single)
    verdict = assess_case(info.qc_reference, inputs)
    if not unavailable:
        return verdict
    return replace(verdict, signals={**verdict.signals, **unavailable})


def _single_modality(prep: dict[str, PreparedVolume], segmenter: Segmenter,
                     role: str) -> np.ndarray:
    """The `role`-only answer on the same model grid, post-processed as that mode is."""
    from cmc_serve import postprocess

    result = segmenter.segment(prep["a"].array if role == Mode.A else None,
                               prep["b"].array if role == Mode.B else None, role)
    return postprocess.apply(result.labels, segmenter.model.postprocessing, role)

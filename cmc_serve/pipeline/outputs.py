"""The output folder: what is written where, and how a run never damages or fakes results.

Layout: OUT/.cmc-output (marks a folder as written by cmc), OUT/report.json,
OUT/failures.csv (a sharded run keeps its own in OUT/.cmc-shards/shard-I-of-N/ and merges
them into these, see `shards`), and per case OUT/<case>/ with seg.nii.gz + seg.json (class names),
seg.dcm (DICOM SEG), rtstruct.dcm (RT Structure Set), sr.dcm (TID 1500 measurement report;
these three for DICOM input), statistics.json, preview.png and `done`.

Output types (`--output-type`, `SegmentOptions.output_types`): nifti, dicom-seg (alias seg),
rtstruct (dicom-rtstruct), sr (dicom-sr), as a comma list; `auto` (the default) is NIfTI plus
the SEG for DICOM input, and `auto,rtstruct,sr` adds the RTSTRUCT and the report for the
DICOM cases of a run (NIfTI cases get NIfTI only), while a DICOM type named without `auto`
is required: a NIfTI case then fails. `sr` reports on the SEG's segments, so it needs
dicom-seg (or auto). The DICOM objects carry codes, provenance and the QC verdict alike
(`cmc_serve.dicom.derived`); absent Type 2 patient/study attributes are written empty and
the case record gets a warning line.

Safety rules (documented in `cmc segment --help`):
- OUT must be new, empty, or an earlier cmc output folder (it holds `.cmc-output`); any other
  existing folder is refused, so a typo cannot mix results into (or overwrite) a user's data.
- Every file is written to a hidden temporary name ('.<name>.XXXX') in its final folder and
  renamed when complete (`cmc_common.files.atomic_write`, with the mode a plain `open`
  would give): a killed run never leaves a partial file
  under a final name, and `clear_case` removes such leftovers.
- A case is finished only when its `done` file exists; it is written last, after the
  geometry check. Re-running a case first removes `done`, then replaces the files; a case
  that fails while writing has its cmc files removed, so no half set survives.
- Only cmc's own file names are ever replaced or removed inside OUT.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cmc_common.contract import OUTPUT_TYPES, OutputType
from cmc_common.files import atomic_write
from cmc_serve.errors import SegmentError

if TYPE_CHECKING:
    from cmc_serve.dicom.derived import Provenance
    from cmc_serve.model_dir import ModelInfo
    from cmc_serve.pipeline.run_case import CaseResult

MARKER = ".cmc-output"
DONE = "done"
SEG_NIFTI = "seg.nii.gz"
SEG_SIDECAR = "seg.json"
SEG_DICOM = "seg.dcm"
RTSTRUCT_DICOM = "rtstruct.dcm"
SR_DICOM = "sr.dcm"
STATISTICS = "statistics.json"
PREVIEW = "preview.png"
REPORT = "report.json"
FAILURES = "failures.csv"
CASE_FILES = (SEG_NIFTI, SEG_SIDECAR, SEG_DICOM, RTSTRUCT_DICOM, SR_DICOM, STATISTICS, PREVIEW,
              DONE)
AUTO_TYPES = "auto"
DICOM_TYPES: dict[str, str] = {OutputType.DICOM_SEG: SEG_DICOM, OutputType.RTSTRUCT: RTSTRUCT_DICOM,
                               OutputType.SR: SR_DICOM}
OUTPUT_ALIASES: dict[str, str] = {"seg": OutputType.DICOM_SEG,
                                  "dicom-rtstruct": OutputType.RTSTRUCT,
                                  "dicom-sr": OutputType.SR}


class OutputError(SegmentError, ValueError):
    """OUT cannot be used, or an output failed its checks."""


class CaseOutputs(NamedTuple):
    """What `write_case_outputs` did: files written, notes (why something was not written)
    and warnings for the case record (e.g. attributes written empty)."""

    written: list[str]
    notes: list[str]
    warnings: list[str]


def parse_output_types(text: str) -> tuple[str, ...]:
    """`--output-type` text -> output types: "auto" alone -> (); else the comma list in
    canonical names (aliases and "_" for "-" accepted, repeats dropped), "auto" kept as a
    member when combined. ValueError saying what is accepted otherwise."""
    names = [t.strip().lower().replace("_", "-") for t in text.split(",") if t.strip()]
    types = tuple(dict.fromkeys(OUTPUT_ALIASES.get(n, n) for n in names))
    if types == (AUTO_TYPES,):
        return ()
    check_output_types(types, text)
    return types


def check_output_types(types: Sequence[str], given: object = None) -> None:
    """Refuse unknown types, and sr without the SEG it reports on (ValueError)."""
    shown = repr(given if given is not None else ",".join(types))
    unknown = [t for t in types if t not in (AUTO_TYPES, *OUTPUT_TYPES)]
    if not types or unknown:
        raise ValueError(f"{shown}: use auto or a comma list of {', '.join(OUTPUT_TYPES)} "
                         "(e.g. auto,rtstruct,sr)")
    if OutputType.SR in types and not {OutputType.DICOM_SEG, AUTO_TYPES} & set(types):
        raise ValueError(f"{shown}: sr reports on the DICOM SEG's segments; add dicom-seg "
                         "(e.g. dicom-seg,sr or auto,sr)")


def resolve_output_types(requested: Sequence[str], dicom: bool) -> tuple[str, ...]:
    """The types to write for one case: `requested` as given, or with auto (() or "auto" in
    it) NIfTI, plus the SEG and the other DICOM types asked for when the case is DICOM."""
    if requested and AUTO_TYPES not in requested:
        return tuple(requested)
    extras = [t for t in requested if t != AUTO_TYPES and (dicom or t not in DICOM_TYPES)]
    base = (OutputType.NIFTI, OutputType.DICOM_SEG) if dicom else (OutputType.NIFTI,)
    return tuple(dict.fromkeys([*base, *extras]))


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def prepare_output_root(out: Path, cmc_version: str) -> None:
    """Create or adopt OUT; refuse a file, a foreign non-empty folder, or an unwritable one."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    # Entries first, marker second: a shard starting beside another may see the other's
    # marker appear between the two looks, and cmc writes nothing into OUT before its marker.
    if out.is_dir() and any(p.name != MARKER for p in out.iterdir()) \
            and not (out / MARKER).is_file():
        raise OutputError(f"{out}: folder exists, is not empty and was not written by cmc "
                          "(no .cmc-output); choose a new or empty output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _create_marker(out / MARKER, cmc_version)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write output folder ({exc.strerror or exc})") from exc


def _create_marker(path: Path, cmc_version: str) -> None:
    """Create `.cmc-output` in place, first thing in a new OUT, unless it is there already.

    Not an atomic rename: shards starting together into one new OUT must never see it
    non-empty (a temporary file) without its marker, and must never rewrite each other's.
    """
    try:
        with open(path, "x") as handle:
            handle.write(json.dumps({"format": "cmc-segment-output",
                                     "cmc_version": cmc_version}) + "\n")
    except FileExistsError:
        pass


def case_dir(out: Path, case_id: str) -> Path:
    return out / case_id


def is_done(out: Path, case_id: str) -> bool:
    """A case is finished when its `done` file holds a readable record."""
    path = case_dir(out, case_id) / DONE
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def clear_case(folder: Path) -> None:
    """Remove cmc's files (done first) and leftover temporaries from a case folder."""
    if not folder.is_dir():
        return
    (folder / DONE).unlink(missing_ok=True)
    for name in CASE_FILES:
        (folder / name).unlink(missing_ok=True)
    for leftover in folder.glob(".*"):
        if any(leftover.name.startswith(f".{name}.") for name in CASE_FILES):
            leftover.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def check_nifti_geometry(path: Path, shape: tuple[int, ...], affine: np.ndarray,
                         orientation_stated: bool = True) -> None:
    """TotalSegmentator's post-run check: the written label map has the input's shape and
    affine (read back from disk, so a writer that reorients or drops the sform is caught).
    For an input that stated no orientation: no orientation either, and its voxel sizes."""
    import nibabel as nib

    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)  # written by nifti_io.write_label_nifti
    if tuple(img.shape) != tuple(shape):
        raise OutputError(f"{path}: written shape {tuple(img.shape)} differs from the input "
                          f"{tuple(shape)}")
    if not orientation_stated:
        codes = (int(img.header["qform_code"]), int(img.header["sform_code"]))
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if codes != (0, 0) or not np.allclose(img.header.get_zooms()[:3], spacing, atol=1e-4):
            raise OutputError(f"{path}: written header (codes {codes}, voxel sizes "
                              f"{img.header.get_zooms()[:3]}) does not keep the input's "
                              "unstated orientation")
        return
    if not np.allclose(img.affine, affine, atol=1e-4):
        raise OutputError(f"{path}: written affine differs from the input's "
                          f"(max diff {np.abs(img.affine - affine).max():.3g} mm)")


def write_done(folder: Path, record: dict[str, Any]) -> None:
    """Mark a case complete: the last file written for it."""
    write_json(folder / DONE, record)


def write_case_outputs(folder: Path, result: CaseResult, class_names: Sequence[str],
                       output_types: Sequence[str], statistics: bool, preview: bool, *,
                       model: ModelInfo | None = None, review: str | None = None
                       ) -> CaseOutputs:
    """Write one case's files (not `done`); on any failure remove what was written.

    `model` gives the DICOM objects their codes and provenance (None: the shipped codes
    table, mode only); `review` is quality control's "needs review: ..." for a flagged case
    (`cmc_serve.qc.flags.review_text`), written into their descriptions. An empty
    segmentation is a valid result: seg.nii.gz is all background, but no DICOM object is
    written (a SEG without segments is not valid DICOM) and a note says so.
    """
    from cmc_serve.pipeline.preview import render_preview
    from cmc_serve.pipeline.statistics import class_statistics

    ref = result.loaded.reference
    volume = ref.volume
    clear_case(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = CaseOutputs([], [], [])
    try:
        if OutputType.NIFTI in output_types:
            from cmc_serve.nifti_io import write_label_nifti

            write_label_nifti(result.labels, volume.affine, folder / SEG_NIFTI, class_names,
                              ref.orientation_stated)
            check_nifti_geometry(folder / SEG_NIFTI, volume.shape, volume.affine,
                                 ref.orientation_stated)
            done.written.extend([SEG_NIFTI, SEG_SIDECAR])
        stats = (class_statistics(result.labels, class_names, volume.affine,
                                  result.loaded.on_reference, result.qc)
                 if statistics or OutputType.SR in output_types else None)
        dicom_types = [t for t in DICOM_TYPES if t in output_types]
        if dicom_types:
            _write_dicom(folder, result, class_names, dicom_types, stats, model, review, done)
        if statistics:
            write_json(folder / STATISTICS, stats)
            done.written.append(STATISTICS)
        if preview:
            atomic_write(folder / PREVIEW,
                         lambda tmp: render_preview(volume.array, result.labels, volume.affine,
                                                    tmp))
            done.written.append(PREVIEW)
    except BaseException:
        clear_case(folder)
        raise
    return done


def dicom_provenance(result: CaseResult, model: ModelInfo | None) -> Provenance:
    """The provenance of a case's DICOM objects: the model, the mode it ran in, the engine."""
    from cmc_serve.dicom.derived import Provenance

    engine = result.engine or {}
    if model is None:
        return Provenance(mode=result.loaded.mode, runtime=engine.get("runtime"),
                          precision=engine.get("precision"))
    return Provenance(model_name=model.name, model_sha256=model.checkpoint_sha256,
                      modalities=model.modalities, mode=result.loaded.mode,
                      runtime=engine.get("runtime"), precision=engine.get("precision"))


def _write_dicom(folder: Path, result: CaseResult, class_names: Sequence[str],
                 types: Sequence[str], stats: dict[str, Any] | None, model: ModelInfo | None,
                 review: str | None, done: CaseOutputs) -> None:
    """The SEG, RTSTRUCT and measurement report of a DICOM case, as `types` asks."""
    from cmc_serve.dicom.codes import resolve
    from cmc_serve.dicom.derived import missing_type2, type2_warning

    ref = result.loaded.reference
    names = ", ".join(DICOM_TYPES[t] for t in types)
    if ref.datasets is None:
        raise OutputError(f"{ref.source.path}: --output-type {','.join(types)} needs a DICOM "
                          "input")
    if not result.labels.any():
        done.notes.append(f"no foreground voxels: {names} not written (DICOM objects need at "
                          "least one structure)")
        return
    missing = missing_type2(ref.datasets)
    if missing:
        done.warnings.append(type2_warning(names, missing))
    codes = model.codes if model is not None and model.codes else resolve(class_names)
    common: dict[str, Any] = {"codes": codes, "provenance": dicom_provenance(result, model),
                              "review": review}
    if OutputType.DICOM_SEG in types:
        from cmc_serve.dicom.seg_writer import write_dicom_seg

        write_dicom_seg(result.labels, ref.datasets, class_names, folder / SEG_DICOM, **common)
        done.written.append(SEG_DICOM)
    if OutputType.RTSTRUCT in types:
        from cmc_serve.dicom.rtstruct_writer import write_rtstruct

        write_rtstruct(result.labels, ref.datasets, class_names, folder / RTSTRUCT_DICOM,
                       **common)
        done.written.append(RTSTRUCT_DICOM)
    if OutputType.SR in types:
        from cmc_serve.dicom.sr_writer import write_measurement_report

        assert stats is not None  # computed whenever sr is asked for
        write_measurement_report(folder / SEG_DICOM, ref.datasets, stats, class_names,
                                 folder / SR_DICOM, **common)
        done.written.append(SR_DICOM)

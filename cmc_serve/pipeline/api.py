"""`cmc segment` as one Python call: `segment(input, out, model, options=...)`.

Data flows one way, CLI -> this function -> files: `cli/segment_cmd.py` only parses the
command line, calls `segment` and maps the result to an exit code, so a script, a notebook
or a service gets exactly what the command does (same checks, same messages, same files).

Order of a run, and why:
1. Everything that can refuse the run is checked first (model dir and the sizes of its
   graph files, pairing rules, OUT not inside INPUT, cases found, shard, dicom-seg needs
   DICOM input) and fails with the one-line message of the check that refused it, a
   `SegmentError` (cmc_serve/errors.py: every refusal's class is one, so it is raised
   where the problem is found and passes through here unchanged).
2. The runtime of every mode the cases will run in is opened (`planned_modes`, from the
   headers alone): its graph files are checked against cmc.json's sha256, and a runtime
   that cannot run here (no GPU, not installed, unreachable Triton server) refuses the run
   now, not at the first case. Nothing has been written and nothing announced yet.
3. OUT is prepared last of all checks (`outputs.prepare_output_root`), so a refused run
   creates nothing.
4. The batch runs with one loaded model (`BatchRunner`). A failing case does not stop it:
   it is counted in `SegmentRunResult.failed` and listed in OUT/failures.csv. With
   `shard`, the run's records go to OUT/.cmc-shards/shard-I-of-N/ and are merged with the
   other shards' into OUT/report.json when it ends (`shards`). Library warnings (pydicom)
   go to the log and to the case they concern, never raw to stderr (`library_warnings`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmc_common.contract import (
    AUTO,
    DEVICES,
    MAX_OVERLAP,
    MODEL_JSON,
    MODES,
    PRECISIONS,
    QC_LEVELS,
    SERVING_RUNTIMES,
    Mode,
    QcLevel,
)
from cmc_serve import __version__
from cmc_serve.compatibility import Assumptions, parse_axis_codes
from cmc_serve.engine import Segmenter
from cmc_serve.errors import SegmentError, SegmentOptionError
from cmc_serve.model_dir import ModelInfo, unverified_message
from cmc_serve.pipeline import cases as case_mod
from cmc_serve.pipeline import library_warnings, outputs, shard_env, shards
from cmc_serve.pipeline.batch import BatchRunner
from cmc_serve.pipeline.html_report import write_batch_report_html
from cmc_serve.pipeline.pairing import PairingRules
from cmc_serve.pipeline.report import CaseRecord, RunReport
from cmc_serve.pipeline.run_case import planned_modes

if TYPE_CHECKING:
    from rich.console import Console

OUTPUT_TYPES = outputs.OUTPUT_TYPES
MAX_JOBS = 16
# report.json records the options under the command line's names where a field's differs
_FLAG_NAMES = {"resume": "continue"}
__all__ = ["SegmentError", "SegmentOptionError", "SegmentOptions", "SegmentRunResult",
           "parse_output_types", "segment"]


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SegmentOptionError(option, f"{value!r} is not one of {', '.join(choices)}")


def parse_output_types(text: str) -> tuple[str, ...]:
    """`--output-type` text -> `SegmentOptions.output_types`: 'auto' -> (), else the comma
    list (`outputs.parse_output_types`: aliases, auto combined with DICOM types)."""
    try:
        return outputs.parse_output_types(text)
    except ValueError as exc:
        raise SegmentOptionError("output_types", str(exc)) from None


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment: the options of `cmc segment` (same names, same defaults).

    `output_types` () means NIfTI, plus DICOM SEG for DICOM input; "auto" combined with
    DICOM types adds them for DICOM cases (`outputs.resolve_output_types`). `shard` (I, N)
    runs only the I-th of N deterministic shares of the cases; the text "I/N", "auto" or "auto/N" is
    resolved at construction (`shard_env`: auto reads the Slurm array's or Kubernetes
    Indexed Job's environment) into (I, N), and `shard_source` says where it came from
    (report.json records it). `resume` is `--continue`: cases whose
    `done` file exists in OUT are skipped. `pairing` is a YAML rules file mapping DICOM
    series to modalities a/b. `qc`: quality control, "on" (the default: the fused pass's two
    decoders, the input fingerprint, the anatomy), "full" (also the a-only and b-only
    passes: the cross-modal opinion, about two more network passes per fused case) or
    "off" (speed runs: none of it, no `qc` in any record). Invalid values raise
    SegmentOptionError at construction.
    """

    mode: str = "auto"
    runtime: str = "auto"
    server: str | None = None
    device: str = "cpu"
    precision: str = "auto"
    overlap: float = 0.5
    tta: bool = False
    output_types: tuple[str, ...] = ()
    statistics: bool = False
    preview: bool = False
    resume: bool = False
    shard: tuple[int, int] | str | None = None
    shard_source: shard_env.ShardSource | None = None
    jobs: int = 1
    pairing: Path | None = None
    assume_registered: bool = False
    assume_orientation: str | None = None
    skip_unreadable: bool = False
    qc: str = QcLevel.ON

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, (AUTO, *MODES))
        _check_choice("qc", self.qc, QC_LEVELS)
        _check_choice("runtime", self.runtime, (AUTO, *SERVING_RUNTIMES))
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, (AUTO, *PRECISIONS))
        if isinstance(self.output_types, str):
            raise SegmentOptionError("output_types", f"{self.output_types!r}: give a tuple of "
                                                     f"{', '.join(OUTPUT_TYPES)}, not a string")
        if self.output_types:
            try:
                outputs.check_output_types(self.output_types)
            except ValueError as exc:
                raise SegmentOptionError("output_types", str(exc)) from None
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise SegmentOptionError("overlap", f"{self.overlap} is not in the range 0 to "
                                                f"{MAX_OVERLAP}")
        if not 1 <= self.jobs <= MAX_JOBS:
            raise SegmentOptionError("jobs", f"{self.jobs} is not in the range 1 to {MAX_JOBS}")
        if isinstance(self.shard, str):  # a ShardChoiceError refuses the `shard` option
            choice = shard_env.parse_shard_text(self.shard, os.environ)
            object.__setattr__(self, "shard", (choice.index, choice.count))
            object.__setattr__(self, "shard_source", choice.source)
        elif self.shard is not None:
            index, count = self.shard
            if not 1 <= index <= count:
                raise SegmentOptionError("shard", f"{self.shard}: expected (I, N) with "
                                                  "1 <= I <= N, e.g. (2, 4)")
            if self.shard_source is None:
                object.__setattr__(self, "shard_source", shard_env.ShardSource("option"))
        if self.assume_orientation is not None:  # SegmentOptionError naming the field
            object.__setattr__(self, "assume_orientation",
                               parse_axis_codes(self.assume_orientation))

    @property
    def share(self) -> tuple[int, int] | None:
        """`shard` as resolved at construction: (I, N), or None to run every case."""
        assert not isinstance(self.shard, str)  # text was resolved in __post_init__
        return self.shard

    @property
    def assumptions(self) -> Assumptions:
        return Assumptions(self.assume_registered, self.assume_orientation,
                           self.skip_unreadable)

    def report_options(self, input: Path, input_b: Path | None) -> dict[str, Any]:
        """The options as report.json records them: every field, in field order, under the
        command line's names, as JSON values."""
        as_json = {"output_types": list(self.output_types) or "auto",
                   "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
                   "shard_source": self.shard_source.record() if self.shard_source else None,
                   "pairing": str(self.pairing) if self.pairing else None}
        return {"input": str(input), "input_b": str(input_b) if input_b else None,
                **{_FLAG_NAMES.get(f.name, f.name): as_json.get(f.name, getattr(self, f.name))
                   for f in fields(self)}}

    def make_segmenter(self, info: ModelInfo) -> Segmenter:
        """The Segmenter these options ask for, its runtimes opened per mode on first use:
        the one way `segment` and the node (`cmc listen`) make theirs."""
        return Segmenter(info, runtime=self.runtime, device=self.device,
                         precision=self.precision, overlap=self.overlap, tta=self.tta,
                         server=self.server)


@dataclass(frozen=True)
class SegmentRunResult:
    """What a run did: counts, where its files are, and every case's record."""

    out: Path
    report: Path  # OUT/report.json
    failures: Path | None  # OUT/failures.csv, None when no case failed
    done: int
    failed: int
    skipped: int
    cases: tuple[CaseRecord, ...]  # per case: status, outputs written, stage and error


def _model_summary(model: Path, info: ModelInfo) -> dict[str, Any]:
    return {"dir": str(model.resolve()), "name": info.name, "cmc_version": info.cmc_version,
            "modalities": list(info.modalities), "classes": list(info.classes),
            "checkpoint_sha256": info.checkpoint_sha256, "files_verified": info.checksums}


def _find_cases(input: Path, input_b: Path | None, out: Path,
                options: SegmentOptions) -> list[case_mod.Case]:
    """The cases of this run (after the shard); refuses OUT inside INPUT and unusable inputs."""
    if input.is_dir() and out.resolve().is_relative_to(input.resolve()):
        raise outputs.OutputError(f"{out}: the output folder must not be inside the input "
                                  f"folder {input} (results would become inputs)")
    found = case_mod.discover_cases(input, input_b,
                                    single_role=Mode.B if options.mode == Mode.B else Mode.A)
    if options.share:
        found = case_mod.select_shard(found, *options.share)
    dicom_types = [t for t in options.output_types if t in outputs.DICOM_TYPES]
    if dicom_types and not any(c.is_dicom for c in found):
        raise case_mod.CaseDiscoveryError(f"{input}: --output-type {','.join(dicom_types)} "
                                          "needs DICOM input")
    return found


def segment(input: Path | str, out: Path | str, model: Path | str,
            input_b: Path | str | None = None, options: SegmentOptions | None = None,
            console: Console | None = None, *,
            segmenter: Segmenter | None = None) -> SegmentRunResult:
    """Segment every case in INPUT (and INPUT_B) with the exported model into OUT.

    Raises SegmentError with a one-line message when the run is refused (nothing written) or
    its runtime is unusable; failing cases are counted, not raised. `console` (rich) gets
    progress and per-case lines; None runs silently. `segmenter`: one already loaded for
    `model` and these options (a long-running service segments many runs with one model
    load); the caller keeps it open, else the run makes and closes its own.
    """
    input, out, model = Path(input), Path(out), Path(model)
    input_b = Path(input_b) if input_b is not None else None
    options = SegmentOptions() if options is None else options
    with library_warnings.routed():
        return _run(input, out, model, input_b, options, console, segmenter)


def _open_checked(info: ModelInfo, rules: PairingRules, found: list[case_mod.Case],
                  options: SegmentOptions, given: Segmenter | None) -> Segmenter:
    """The run's Segmenter (`given`, or a new one) with the runtime of every mode the cases
    need already open; a new one is closed again if that fails."""
    segmenter = given or options.make_segmenter(info)
    modes = planned_modes(found, info, rules, options.mode)
    if options.qc == QcLevel.FULL and Mode.FUSED in modes:  # the cross-modal opinion's graphs
        modes += [m for m in ("a", "b") if m in info.modes and m not in modes]
    try:
        for mode in modes:
            segmenter.runtime_for(mode)
    except BaseException:
        if given is None:
            segmenter.close()
        raise
    return segmenter


def _run(input: Path, out: Path, model: Path, input_b: Path | None, options: SegmentOptions,
         console: Console | None, given: Segmenter | None) -> SegmentRunResult:
    info = ModelInfo.load(model)
    rules = (PairingRules.from_yaml(options.pairing, info.modalities) if options.pairing
             else PairingRules.default(info.modalities))
    found = _find_cases(input, input_b, out, options)
    if options.share and options.shard_source:
        shard_env.check_out_sharding(out, *options.share, options.shard_source)
    segmenter = _open_checked(info, rules, found, options, given)
    with segmenter if given is None else nullcontext(segmenter):
        outputs.prepare_output_root(out, __version__)  # last: a refused run creates nothing
        records = shards.shard_dir(out, *options.share) if options.share else out
        # Made now, not with the first record: a shard of another N starting later sees it.
        records.mkdir(parents=True, exist_ok=True)
        report = RunReport(options=options.report_options(input, input_b),
                           model=_model_summary(model, info))
        if console is not None:
            shard = f" (shard {options.share[0]}/{options.share[1]})" if options.share else ""
            console.print(f"cmc segment: {len(found)} case(s){shard} -> {out}",
                          highlight=False, markup=False, soft_wrap=True)
            if not info.checksums:
                console.print("cmc segment: warning: " + unverified_message(
                    model / MODEL_JSON, info.cmc_version), highlight=False, markup=False,
                    soft_wrap=True)
        try:
            BatchRunner(out, info, segmenter, rules, options, report, console,
                        records).run(found)
        finally:
            if options.share:
                shards.merge_shards(out, options.share[1])  # also writes report.html
    if not options.share:
        write_batch_report_html(out)  # the page a person opens: thumbnails, volumes, outliers
    counts = report.counts()
    return SegmentRunResult(out=out, report=out / outputs.REPORT,
                            failures=records / outputs.FAILURES if counts["failed"] else None,
                            done=counts["done"], failed=counts["failed"],
                            skipped=counts["skipped"], cases=tuple(report.cases))

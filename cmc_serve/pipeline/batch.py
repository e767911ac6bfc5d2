"""The batch runner: many cases, one loaded model, I/O overlapped with inference.

- The Segmenter (model/runtime sessions) is created once by the caller and reused for every
  case: reloading per case is the top complaint about comparable tools.
- `jobs` worker threads read and pre-process the next cases while the main thread runs
  inference on the current one; at most `jobs + 1` cases are in memory at once.
- A case that fails is logged with its stage and reason in failures.csv (rewritten after
  each failure, so it survives a killed run) and the batch goes on. report.json and
  failures.csv go to `records` (OUT, or a shard's own folder, see `shards`).
- `resume` (`--continue`) skips cases whose `done` file exists.
- Quality control (`qc`, `contract.QcLevel`) judges each case; a flagged case is done
  like any other (its outputs written, the DICOM objects' descriptions saying "needs
  review: ..."), its verdict in report.json and `done`, and the console says why.
- A runtime that cannot run here (RuntimeUnavailable: not installed, no GPU, engine built
  for another GPU) stops the run at the first case instead of failing every case alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from cmc_common.errors import CmcError, one_line
from cmc_serve.engine import Segmenter
from cmc_serve.model_dir import ModelFileError, ModelInfo
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.cases import Case
from cmc_serve.pipeline.pairing import PairingRules
from cmc_serve.pipeline.report import CaseRecord, RunReport, write_report
from cmc_serve.pipeline.run_case import (
    CaseResult,
    LoadedCase,
    failed_stage,
    load_case,
    segment_case,
)
from cmc_serve.qc.flags import review_text, score_text
from cmc_serve.runtimes import RuntimeUnavailable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from cmc_serve.pipeline.api import SegmentOptions  # api imports this module


def _inputs(case: Case) -> list[str]:
    return [s.describe() for s in case.sources] or [str(case.origin)]


def _error(exc: BaseException, running: str) -> tuple[str, str]:
    """(stage, one-line message) of a failure in the stage the batch was `running`."""
    message = one_line(exc)
    if not isinstance(exc, (CmcError, ValueError, OSError)):
        message = f"{type(exc).__name__}: {message}"
    return failed_stage(exc, running), message


class BatchRunner:
    """Runs cases into OUT with one segmenter; see the module docstring for the rules."""

    def __init__(self, out: Path, info: ModelInfo, segmenter: Segmenter,
                 rules: PairingRules, options: SegmentOptions, report: RunReport,
                 console: Console | None = None, records: Path | None = None) -> None:
        self.out, self.info, self.segmenter = out, info, segmenter
        self.records = out if records is None else records
        self.rules, self.options, self.report = rules, options, report
        self.console = console

    def _outputs_for(self, result: CaseResult) -> tuple[str, ...]:
        """The explicit list, or with auto NIfTI plus the DICOM objects when the labels' grid
        is a DICOM series (`outputs.resolve_output_types`)."""
        dicom = result.loaded.reference.datasets is not None
        return outputs.resolve_output_types(self.options.output_types, dicom)

    # ------------------------------------------------------------------ bookkeeping
    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def _flush(self) -> None:
        """Rewrite report.json and failures.csv (atomic) so a killed run keeps them."""
        write_report(self.records, self.report.to_dict())

    def _fail(self, record: CaseRecord, exc: BaseException, stage: str) -> None:
        record.status = "failed"
        record.stage, record.error = _error(exc, stage)
        self.report.add(record)
        self._say(f"[red]FAILED[/red] {escape(record.case_id)} ({record.stage}): "
                  f"{escape(record.error or '')}")
        self._flush()

    # ------------------------------------------------------------------ the run
    def _loads(self, cases: Sequence[Case], pool: ThreadPoolExecutor
               ) -> Iterator[tuple[Case, Future[LoadedCase]]]:
        """Yield (case, future) in order, keeping `jobs` loads ahead of the consumer."""
        pending: deque[tuple[Case, Future[LoadedCase]]] = deque()
        todo = iter(cases)

        def submit() -> None:
            case = next(todo, None)
            if case is not None:
                pending.append((case, pool.submit(load_case, case, self.info, self.rules,
                                                  self.options.mode,
                                                  self.options.assumptions)))

        for _ in range(self.options.jobs):
            submit()
        while pending:
            item = pending.popleft()
            submit()
            yield item

    def run(self, cases: Sequence[Case]) -> RunReport:
        """Segment `cases` (skipping finished ones under `resume`); returns the report."""
        (self.records / outputs.FAILURES).unlink(missing_ok=True)
        todo = []
        for case in cases:
            if self.options.resume and outputs.is_done(self.out, case.case_id):
                self.report.add(CaseRecord(case.case_id, "skipped", _inputs(case)))
            else:
                todo.append(case)
        skipped = len(cases) - len(todo)
        if skipped:
            self._say(f"--continue: {skipped} finished case(s) skipped")
        try:
            with _Progress(self.console, len(todo)) as advance, \
                    ThreadPoolExecutor(max_workers=max(1, self.options.jobs),
                                       thread_name_prefix="cmc-read") as pool:
                for case, future in self._loads(todo, pool):
                    self._run_one(case, future)
                    advance(case.case_id)
            self.report.finished = True
        finally:
            self._flush()
        return self.report

    def _run_one(self, case: Case, future: Future[LoadedCase]) -> None:
        record = CaseRecord(case.case_id, "done", _inputs(case))
        folder = outputs.case_dir(self.out, case.case_id)
        stage = "read"
        try:
            loaded = future.result()
            record.mode, record.pairing = loaded.mode, loaded.pairing
            record.assumptions, record.warnings = loaded.assumptions, loaded.warnings
            stage = "infer"
            result = segment_case(loaded, self.segmenter, self.options.qc)
            record.qc = result.qc.to_json() if result.qc else None
            stage = "write"
            with loaded.timer.stage("write"):
                written = outputs.write_case_outputs(
                    folder, result, self.info.classes, self._outputs_for(result),
                    self.options.statistics, self.options.preview, model=self.info,
                    review=review_text(result.qc.flags) if result.qc and result.qc.flagged
                    else None)
            record.outputs = written.written
            record.pairing += written.notes
            record.warnings += written.warnings
            record.timings = dict(loaded.timer.seconds)
            record.engine = result.engine
            outputs.write_done(folder, record.to_dict())  # last: the case is now complete
        except (RuntimeUnavailable, ModelFileError):
            outputs.clear_case(folder)
            raise
        except Exception as exc:  # one bad case must not stop the batch
            if future.done() and future.exception() is None:
                record.timings = dict(future.result().timer.seconds)
            outputs.clear_case(folder)
            self._fail(record, exc, stage)
            return
        if result.engine and not self.report.engine:
            self.report.engine = dict(result.engine)
        self.report.add(record)
        total = sum(record.timings.values())
        self._say(f"[green]done[/green] {escape(case.case_id)}  mode={record.mode}  "
                  f"{total:.2f} s  -> {escape(str(folder))}")
        for reason in record.pairing:
            self._say(f"  [dim]{escape(reason)}[/dim]")
        for key, what in record.assumptions.items():
            self._say(f"  [yellow]--{key.replace('_', '-')}[/yellow]: {escape(what)}")
        for warning in record.warnings:
            self._say(f"  [yellow]warning[/yellow]: {escape(warning)}")
        if result.qc and result.qc.flagged:
            self._say(f"  [yellow]needs review[/yellow] (QC score {score_text(result.qc.score)}): "
                      + escape("; ".join(f.message for f in result.qc.flags)))
        self._flush()


class _Progress:
    """A rich progress bar over cases (plain lines when there is no console)."""

    def __init__(self, console: Console | None, total: int) -> None:
        self.console, self.total = console, total
        self.bar: Progress | None = None

    def __enter__(self) -> Callable[[str], None]:
        if self.console is None:
            return lambda case_id: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=self.console, transient=True)
        bar.start()
        task = bar.add_task("segmenting", total=self.total)
        return lambda case_id: bar.update(task, advance=1, description=case_id)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

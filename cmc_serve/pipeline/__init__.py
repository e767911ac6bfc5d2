"""`cmc segment`'s pipeline: cases from the inputs, one model for the whole run, outputs.

- `segment`: the whole command as one call, `segment(input, out, model, input_b,
  SegmentOptions(...))` -> `SegmentRunResult`; a refused run raises `SegmentError`. The CLI
  only parses options and calls it. Re-exported below, so the package attribute `segment` is
  the function: take the module's other names with `from cmc_serve.pipeline.api import`.
- `cases`: INPUT [INPUT_B] -> `Case` list (NIfTI files, DICOM series, study trees), shards.
- `pairing`: which series of a study is modality a and which b, by explicit rules.
- `run_case`: read -> pre-process (b resampled into a's world grid) -> infer -> labels on
  the source grid; each stage fails with a `CaseError` naming it.
- `outputs`, `statistics`, `preview`: the files of a case, written atomically, `done` last.
- `report`: report.json (versions, engine actually used, timings) and failures.csv.
- `batch`: the runner (model loaded once, reading overlapped with inference, --continue).
- `dicomweb`: `segment --from-dicomweb URL --study UID`: WADO-RS in, STOW-RS out.

Modules import their heavy dependencies lazily; none imports torch.
"""

from cmc_serve.pipeline.api import (
    SegmentError,
    SegmentOptionError,
    SegmentOptions,
    SegmentRunResult,
    segment,
)

__all__ = ["SegmentError", "SegmentOptionError", "SegmentOptions", "SegmentRunResult",
           "segment"]

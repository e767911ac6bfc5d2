"""`cmc segment`'s pipeline: cases from the inputs, one model for the whole run, outputs.

- `cases`: INPUT [INPUT_B] -> `Case` list (NIfTI files, DICOM series, study trees), shards.
- `pairing`: which series of a study is modality a and which b, by explicit rules.
- `run_case`: read -> pre-process (b resampled into a's world grid) -> infer -> labels on
  the source grid; each stage fails with a `CaseError` naming it.
- `outputs`, `statistics`, `preview`: the files of a case, written atomically, `done` last.
- `report`: report.json (versions, engine actually used, timings) and failures.csv.
- `batch`: the runner (model loaded once, reading overlapped with inference, --continue).
- `engine_factory`: the Segmenter for the options (local runtime or a Triton server).

Modules import their heavy dependencies lazily; none imports torch.
"""

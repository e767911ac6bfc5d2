"""`cmc listen`: a DICOM node that segments studies as the PACS sends them.

A PACS (or a modality, or Orthanc's routing rule) C-STOREs a study to the node; when no
instance of the study has arrived for `study_timeout` seconds the study is complete, goes
through exactly what `cmc segment` does to a folder (`cmc_serve.pipeline.api.segment`, with
the one Segmenter loaded at start-up) and the DICOM SEG is sent back by C-STORE and/or
STOW-RS. Modules, one job each:

- `spool`: the on-disk truth: received instances (written atomically, fsync'd before the
  sender is told "stored") and each study's state (received -> segmenting -> delivering ->
  done | failed, with the reason). A restarted node resumes from it after any kill.
- `study_record`: study.json, one study's state and delivery ledger, read and written.
- `scp`: the pynetdicom Storage SCP (C-ECHO, C-STORE of CT/MR images; other SOP classes,
  truncated instances and unknown calling AE titles refused with DICOM statuses).
- `delivery`: C-STORE and STOW-RS destinations, the retry/backoff policy, and the delivery
  ledger that keeps a SEG from being sent twice (by SEG SOP Instance UID).
- `worker`: picks the next complete study, segments it, delivers it.
- `status_http`: the status page and `/health`.
- `service`: `listen(...)`, the whole node as one call (the CLI only parses options).

Nothing here imports torch (tests/test_serve_no_torch.py).
"""

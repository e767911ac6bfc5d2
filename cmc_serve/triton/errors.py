"""What can go wrong talking to a Triton server, one class per way a caller reacts.

Every failure surfaces as one line naming the server and the model: `TritonUnavailable`
(server down or gone, after a bounded retry), `TritonTimeout`, `TritonInferenceError` (the
server's own message, e.g. a wrong shape or data type) or `TritonModelMismatch` (the
served model is not the one the local cmc.json describes).
"""

from __future__ import annotations

from cmc_serve.errors import RuntimeUnavailable, SegmentError


class TritonClientError(SegmentError, RuntimeError):
    """Base of every error raised by these clients (one line: server, model, problem); a
    SegmentError, as `cmc segment --runtime triton` documents its refusals."""


class TritonUnavailable(TritonClientError, RuntimeUnavailable):
    """The server cannot be reached, is not ready, or went away during a request: no case
    can run, so a run stops (RuntimeUnavailable)."""


class TritonTimeout(TritonClientError):
    """The server did not answer within the client's timeout."""


class TritonInferenceError(TritonClientError):
    """The server answered with an error; its message is passed through."""


class TritonModelMismatch(TritonClientError, RuntimeUnavailable):
    """The served model's inputs/outputs disagree with the local cmc.json: the runtime
    cannot run this model (RuntimeUnavailable)."""

"""The errors every refusal of a `cmc segment` run is an instance of.

`cmc_serve.pipeline.segment` (and `cmc listen`, which runs it per study) documents one
error for a refused run, `SegmentError`, and one for a refused option, `SegmentOptionError`.
They are defined here, below every module that raises a refusal, so that each refusal is
raised once where the problem is found with its own class (`ModelDirError`,
`CaseDiscoveryError`, `DicomScanError`, `PairingError`, `RuntimeUnavailable`, `OutputError`,
`ShardChoiceError`), that class being a SegmentError: the run lets it through unchanged and
a caller's `except SegmentError` still catches every refusal. `cmc_serve.pipeline` exports
both names.
"""

from __future__ import annotations

from cmc_common.errors import CmcError, OptionError


class SegmentError(CmcError):
    """The run was refused (nothing written) or its runtime proved unusable; str() is the
    one-line message naming the file or option and the problem."""


class RuntimeUnavailable(SegmentError, RuntimeError):
    """The requested runtime/device/precision cannot run here (not installed, no GPU, no
    graph exported for it, incompatible engine, a Triton server unreachable or serving
    another model, silent fallback detected); the run stops, as no case could run."""


class SegmentOptionError(SegmentError, OptionError):
    """A `SegmentOptions` value is not accepted; `option` names the field, `problem` says why
    (so a command line can report it against its own flag)."""

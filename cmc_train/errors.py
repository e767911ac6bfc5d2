"""`ConfigError`: a value cmc_train was given is not one it accepts.

The settings of a training run (presets, run config YAML, `--set`, normalisations,
`--threads`), of a dataset import (`SplitOptions`, the MS-CMRSeg sequences) and of a
synthetic study are checked where they are used; a bad one raises this error naming the
value and what is accepted, which `cmc train`, `cmc import` and `cmc synth` print as their
one error line (cli/errors.py). It keeps `ValueError` as its second base: code that calls
these functions and catches ValueError still catches it.
"""

from __future__ import annotations

from cmc_common.errors import CmcError


class ConfigError(CmcError, ValueError):
    """A setting's value is not accepted; str() is one line naming it and what is allowed."""

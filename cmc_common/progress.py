"""`Say`: the one shape of a progress callback, shared by training, export and serving.

Long work reports what it is doing one line at a time (the node's study events, an export's
parity gates, a training run's milestones, a DICOMweb retrieval). Each caller decides where
the lines go (standard error with a time stamp, a rich console, a test's list), so library
code takes a `Say` and never prints on its own.
"""

from __future__ import annotations

from collections.abc import Callable

Say = Callable[[str], None]
"""Called with one finished line of text (no trailing newline); its result is ignored."""

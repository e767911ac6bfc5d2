"""Exceptions of the exporter: each carries a one-line message naming the file and the problem."""

from __future__ import annotations


class ExportError(Exception):
    """The export cannot proceed (bad checkpoint, unwritable output, missing runtime...)."""


class GateFailed(ExportError):
    """A parity gate rejected a graph; the message holds the measured numbers."""

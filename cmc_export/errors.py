"""Exceptions of the exporter: each carries a one-line message naming the file and the problem."""

from __future__ import annotations

from typing import Any

from cmc_common.errors import CmcError


class ExportError(CmcError):
    """The export cannot proceed (bad checkpoint, unwritable output, missing runtime...)."""


class GateFailed(ExportError):
    """A parity gate rejected a graph; the message names each limit missed.

    `numbers` holds everything the gate measured, so a refusal can be recorded in cmc.json.
    """

    def __init__(self, message: str, numbers: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.numbers = numbers or {}

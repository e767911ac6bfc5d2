"""Build the one Segmenter a `cmc segment` run uses, local runtime or Triton server.

With `--runtime triton` tiling, blending and stitching still run locally (the engine is the
same); only each batch of patches goes to the server's `<name>_patch` model, so messages
stay patch-sized (never a whole fp32 volume, see Triton's message caps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmc_serve.engine import Segmenter
from cmc_serve.runtimes import PatchRuntime, RuntimeUnavailable


class TritonSegmenter(Segmenter):
    """A Segmenter whose patch runtime is a Triton server (`TritonPatchRuntime`)."""

    def __init__(self, model_dir: str | Path, server: str, **kwargs: Any) -> None:
        super().__init__(model_dir, runtime="triton", device="cpu", **kwargs)
        self.server = server
        self._remote: dict[str, PatchRuntime] = {}

    def runtime_for(self, mode: str) -> PatchRuntime:
        if mode not in self._remote:
            from cmc_serve.triton.client import TritonClientError, TritonPatchRuntime

            try:
                self._remote[mode] = TritonPatchRuntime(self.server, self.model, mode)
            except TritonClientError as exc:  # unreachable, or not this model: stop the run
                raise RuntimeUnavailable(str(exc)) from exc
        return self._remote[mode]

    def close(self) -> None:
        for rt in self._remote.values():
            rt.close()
        self._remote.clear()
        super().close()


def make_segmenter(model_dir: Path, runtime: str, device: str, precision: str,
                   overlap: float, tta: bool, server: str | None) -> Segmenter:
    """The Segmenter for the command-line options; Triton needs `server`."""
    if runtime != "triton":
        if server is not None:
            raise RuntimeUnavailable("--server is only used with --runtime triton")
        return Segmenter(model_dir, runtime=runtime, device=device, precision=precision,
                         overlap=overlap, tta=tta)
    if server is None:
        raise RuntimeUnavailable("--runtime triton needs --server grpc://HOST:PORT or "
                                 "http://HOST:PORT")
    try:
        import cmc_serve.triton.client  # noqa: F401
    except ImportError as exc:
        raise RuntimeUnavailable(f"the Triton runtime is not available: {exc}") from exc
    return TritonSegmenter(model_dir, server, overlap=overlap, tta=tta)

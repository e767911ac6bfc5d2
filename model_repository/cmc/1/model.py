"""Triton python-backend model `<name>`: whole-volume segmentation on the server (BLS).

Takes a pre-processed volume, `image_a` and/or `image_b` [1, D, H, W] (FP16 or FP32, as
the config declares; both optional, at least one given), tiles it with cmc's gaussian
sliding window (`cmc_serve.tiling`), sends the tiles in batches to the patch model through
BLS with several batches in flight, blends them with cmc's bounded-memory slab stitcher
(`cmc_serve.stitching`) and returns `labels` uint8 [1, D, H, W] and, when requested,
`probs` FP32 [1, K, D, H, W]. Tiles are blended in grid order whatever order the patch
model answers in, so the result is identical to `cmc segment` with the same graph.

Which patch model runs follows from the images given: both -> "fused", only image_a ->
"a", only image_b -> "b". config.pbtxt `parameters` (string values):
  patch_models      JSON object mode -> patch model name, e.g. {"fused": "cmc_patch"}
  patch_size        "P,P,P" (the patch models' tile edge)
  num_classes       K (background included)
  patch_input_type  TYPE_FP32 (default) | TYPE_FP16: the patch models' input data type
  tile_batch        tiles per patch request (default 4; at most the patch max_batch_size)
  max_in_flight     patch requests in flight per volume (default 4)
  overlap           tile overlap fraction (default 0.5)
  sigma_scale       gaussian sigma as a fraction of the patch (default 0.125)
  postprocessing    JSON, the checkpoint's post-processing choice (`cmc_serve.postprocess`),
                    applied to `labels` as `cmc segment` applies it (absent: none)
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from cmc_common.contract import MODE_INPUTS
from cmc_common.errors import CmcError
from cmc_serve import postprocess
from cmc_serve.stitching import SlabStitcher
from cmc_serve.tiling import TileGrid, extract_patch, gaussian_importance


class VolumeRequestError(CmcError, ValueError):
    """A request this model cannot serve; its message goes back to the client as is."""


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


def _batches(grid: TileGrid, size: int) -> Iterator[list[tuple[int, int, int]]]:
    batch: list[tuple[int, int, int]] = []
    for origin in grid.origins():
        batch.append(origin)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def _blend_oldest(stitcher: SlabStitcher, pending: deque[Any]) -> None:
    """Wait for the oldest batch in flight and blend it (grid order keeps results exact)."""
    origins, task = pending.popleft()
    for origin, tile in zip(origins, await task, strict=True):
        stitcher.add(origin, tile)


def _require_scipy(name: str) -> None:
    """Post-processing labels connected components with scipy; say so at load time."""
    try:
        import scipy.ndimage  # noqa: F401
    except ImportError:
        raise pb_utils.TritonModelException(
            f"{name}: the recorded post-processing needs scipy in the server's Python "
            "(`make triton-server` installs it; in a container: pip install scipy)") from None


class TritonPythonModel:
    """Tiles, dispatches (BLS, bounded in flight) and stitches one volume per request."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = _parameters(config)
        try:
            self.patch_models: dict[str, str] = json.loads(params["patch_models"])
            patch = tuple(int(v) for v in params["patch_size"].split(","))
            self.num_classes = int(params["num_classes"])
            self.patch_dtype = pb_utils.triton_string_to_numpy(
                params.get("patch_input_type", "TYPE_FP32"))
            self.tile_batch = int(params.get("tile_batch", 4))
            self.max_in_flight = int(params.get("max_in_flight", 4))
            self.overlap = float(params.get("overlap", 0.5))
            sigma_scale = float(params.get("sigma_scale", 0.125))
            self.postprocessing = json.loads(params.get("postprocessing") or "null")
            if self.postprocessing is not None:
                postprocess.check_record(self.postprocessing, self.num_classes)
                _require_scipy(self.name)
        except (KeyError, ValueError, TypeError) as exc:  # PostprocessError is a ValueError
            raise pb_utils.TritonModelException(
                f"{self.name}: bad or missing config.pbtxt parameter ({exc!r})") from exc
        unknown = set(self.patch_models) - set(MODE_INPUTS)
        if len(patch) != 3 or unknown or not self.patch_models or self.tile_batch < 1 \
                or self.max_in_flight < 1:
            raise pb_utils.TritonModelException(
                f"{self.name}: invalid parameters patch_size={patch} patch_models="
                f"{self.patch_models} tile_batch={self.tile_batch} "
                f"max_in_flight={self.max_in_flight}")
        self.patch = (patch[0], patch[1], patch[2])
        self.weights = gaussian_importance(self.patch, sigma_scale)

    async def execute(self, requests: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self._answer(r) for r in requests)))

    async def _answer(self, request: Any) -> Any:
        try:
            images, mode = self._images(request)
            wanted = set(request.requested_output_names()) or {"labels"}
            labels, probs = await self._segment(images, mode, keep_probs="probs" in wanted)
            labels = postprocess.apply(labels, self.postprocessing, mode)
        except VolumeRequestError as exc:
            return pb_utils.InferenceResponse(output_tensors=[],
                                              error=pb_utils.TritonError(f"{self.name}: {exc}"))
        except Exception as exc:  # anything else: still one clear line, model stays loaded
            error = pb_utils.TritonError(f"{self.name}: {type(exc).__name__}: {exc}")
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        outputs = [pb_utils.Tensor("labels", labels[None])]
        if probs is not None:
            outputs.append(pb_utils.Tensor("probs", probs[None]))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _images(self, request: Any) -> tuple[dict[str, np.ndarray], str]:
        images = {}
        for name in ("image_a", "image_b"):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                images[name] = tensor.as_numpy()
        mode = {inputs: mode for mode, inputs in MODE_INPUTS.items()}.get(tuple(images))
        if mode is None:
            raise VolumeRequestError("send image_a and/or image_b")
        if mode not in self.patch_models:
            raise VolumeRequestError(f"mode {mode!r} (from the inputs {sorted(images)}) is not "
                                     f"served here; this repository serves "
                                     f"{sorted(self.patch_models)}")
        shapes = {a.shape for a in images.values()}
        shape = shapes.pop()
        if shapes or len(shape) != 4 or shape[0] != 1:
            raise VolumeRequestError(f"inputs must be one [1, D, H, W] grid, got "
                                     f"{[a.shape for a in images.values()]}")
        for name, image in images.items():
            if not np.isfinite(image).all():
                raise VolumeRequestError(f"{name} contains NaN or infinite values")
        return {k: v[0] for k, v in images.items()}, mode

    async def _segment(self, images: dict[str, np.ndarray], mode: str,
                       keep_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        shape = next(iter(images.values())).shape
        grid = TileGrid.build(shape, self.patch, self.overlap)
        stitcher = SlabStitcher(grid, self.num_classes, self.weights, keep_probs=keep_probs)
        pending: deque[tuple[list[tuple[int, int, int]], asyncio.Task[np.ndarray]]] = deque()
        try:
            for origins in _batches(grid, self.tile_batch):
                if len(pending) == self.max_in_flight:
                    await _blend_oldest(stitcher, pending)
                pending.append((origins,
                                asyncio.ensure_future(self._infer(mode, images, origins))))
            while pending:
                await _blend_oldest(stitcher, pending)
        finally:  # a failed batch: drop the rest instead of leaving them running
            for _, task in pending:
                task.cancel()
        return stitcher.result()

    async def _infer(self, mode: str, images: dict[str, np.ndarray],
                     origins: list[tuple[int, int, int]]) -> np.ndarray:
        inputs = []
        for name in MODE_INPUTS[mode]:
            tiles = np.stack([extract_patch(images[name], o, self.patch) for o in origins])
            inputs.append(pb_utils.Tensor(name, tiles[:, None].astype(self.patch_dtype)))
        request = pb_utils.InferenceRequest(model_name=self.patch_models[mode],
                                            requested_output_names=["probs"], inputs=inputs)
        response = await request.async_exec()
        if response.has_error():
            raise VolumeRequestError(f"patch model {self.patch_models[mode]} failed: "
                                     f"{response.error().message()}")
        probs = pb_utils.get_output_tensor_by_name(response, "probs").as_numpy()
        expected = (len(origins), self.num_classes, *self.patch)
        if probs.shape != expected:
            raise VolumeRequestError(f"patch model {self.patch_models[mode]} returned probs "
                                     f"{probs.shape}, expected {expected} "
                                     "(num_classes/patch_size)")
        return probs.astype(np.float32, copy=False)

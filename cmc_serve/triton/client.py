"""Clients for a Triton server serving a cmc model repository (gRPC or HTTP).

`TritonPatchRuntime` is a `PatchRuntime` (cmc_serve.runtimes) whose graph runs on the
server's `<name>_patch` model, so the engine tiles and stitches locally exactly as with a
local runtime (`cmc segment --runtime triton`: `open_runtime(..., runtime="triton",
server=URL)`). A batch of tiles is split into several requests sent together (async_infer),
so the server's dynamic batcher can fill its batches across clients. `TritonVolumeClient`
sends a whole pre-processed volume to the `<name>` model, which tiles on the server.

Every failure surfaces as one line naming the server and the model, as one of the
`cmc_serve.triton.errors` classes.
"""

from __future__ import annotations

import importlib
import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmc_common.contract import (
    MODE_INPUTS,
    MODE_OUTPUTS,
    Mode,
    Precision,
    Runtime,
    patch_model_name,
)
from cmc_common.errors import one_line
from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes.base import check_batch, check_outputs
from cmc_serve.triton.errors import (
    TritonClientError,
    TritonInferenceError,
    TritonModelMismatch,
    TritonTimeout,
    TritonUnavailable,
)

MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's limit; the default 4 MiB is below one 128^3 tile pair
TRANSIENT_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
TIMEOUT_GRPC = ("StatusCode.DEADLINE_EXCEEDED",)
HTTP_TIMEOUT_MESSAGE = "failed to obtain inference response"  # tritonclient.http's wording
NUMPY_TO_TRITON: dict[np.dtype[Any], str] = {
    np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.uint8): "UINT8"}
TRITON_TO_NUMPY: dict[str, np.dtype[Any]] = {v: k for k, v in NUMPY_TO_TRITON.items()}


@dataclass(frozen=True)
class Endpoint:
    """`grpc://host:port` or `http://host:port`."""

    protocol: str
    address: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        protocol, sep, address = url.partition("://")
        if not sep or protocol not in ("grpc", "http") or not address:
            raise ValueError(f"Triton URL {url!r} must look like grpc://127.0.0.1:8001 or "
                             "http://127.0.0.1:8000")
        return cls(protocol, address)

    @property
    def loopback(self) -> bool:
        host = self.address.rsplit(":", 1)[0].strip("[]")
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.protocol}://{self.address}"


class TritonConnection:
    """One tritonclient client of either protocol, with errors mapped to ours.

    The low-level layer of the two clients below: readiness, metadata and bounded,
    retried, concurrent inference of arbitrary named tensors.
    """

    def __init__(self, url: str, timeout_s: float, concurrency: int) -> None:
        self.endpoint = Endpoint.parse(url)
        self.timeout_s = timeout_s
        # tritonclient.grpc / tritonclient.http share their API (InferInput, ...).
        self.module: Any = importlib.import_module(f"tritonclient.{self.endpoint.protocol}")
        if self.endpoint.protocol == "grpc":
            self.client: Any = self.module.InferenceServerClient(
                self.endpoint.address,
                channel_args=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                              ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                              # gRPC honours $http_proxy; no proxy can reach our loopback
                              ("grpc.enable_http_proxy", int(not self.endpoint.loopback))])
        else:
            self.client = self.module.InferenceServerClient(
                self.endpoint.address, concurrency=concurrency, connection_timeout=timeout_s,
                network_timeout=timeout_s)

    def error(self, exc: BaseException, model: str) -> TritonClientError:
        """Map a tritonclient/socket exception to one of our one-line errors."""
        from tritonclient.utils import InferenceServerException

        where = f"Triton at {self.endpoint} (model {model})"
        timeout = TritonTimeout(f"{where}: no answer within {self.timeout_s:g} s")
        if isinstance(exc, InferenceServerException):
            status, message = str(exc.status()), one_line(exc.message() or exc)
            if status in TIMEOUT_GRPC or message == HTTP_TIMEOUT_MESSAGE:
                return timeout
            if status in TRANSIENT_GRPC:
                return TritonUnavailable(f"{where}: server unreachable or gone ({message})")
            return TritonInferenceError(f"{where}: server error: {message}")
        if isinstance(exc, (TimeoutError, socket.timeout)) or type(exc).__name__ == "Timeout":
            return timeout
        # refused, reset, closed mid-response (geventhttpclient's own classes): no server
        if isinstance(exc, OSError) or type(exc).__module__.startswith("geventhttpclient"):
            return TritonUnavailable(f"{where}: server unreachable or gone "
                                     f"({type(exc).__name__}: {one_line(exc)})")
        return TritonClientError(f"{where}: {type(exc).__name__}: {one_line(exc)}")

    def check_ready(self, model: str) -> None:
        """Raise TritonUnavailable unless the server and `model` are ready."""
        try:
            server_ready = self.client.is_server_ready()
            model_ready = server_ready and self.client.is_model_ready(model)
        except Exception as exc:  # tritonclient raises many kinds here
            raise self.error(exc, model) from exc
        if not model_ready:
            state = "model not ready (not in the repository or failed to load)" \
                if server_ready else "server not ready"
            raise TritonUnavailable(f"Triton at {self.endpoint} (model {model}): {state}")

    def metadata(self, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metadata, config) as plain dicts; gRPC's int64 fields come back as strings."""
        try:
            if self.endpoint.protocol == "grpc":
                meta = self.client.get_model_metadata(model, as_json=True)
                config = self.client.get_model_config(model, as_json=True)["config"]
            else:
                meta = self.client.get_model_metadata(model)
                config = self.client.get_model_config(model)
        except Exception as exc:
            raise self.error(exc, model) from exc
        return meta, config

    def infer_many(self, model: str, requests: Sequence[dict[str, np.ndarray]],
                   outputs: Sequence[str], max_in_flight: int,
                   retries: int) -> list[dict[str, np.ndarray]]:
        """Send `requests` with at most `max_in_flight` outstanding; results in order.

        Requests that fail because the server is unreachable are re-sent up to `retries`
        times (0.5 s, 1 s, ... apart); any other error is raised at once.
        """
        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        for attempt in range(retries + 1):
            failed: list[tuple[int, TritonClientError]] = []
            for start in range(0, len(todo), max_in_flight):
                wave = todo[start:start + max_in_flight]
                outcomes = self._wave(model, [requests[i] for i in wave], outputs)
                for index, outcome in zip(wave, outcomes, strict=True):
                    if isinstance(outcome, TritonClientError):
                        failed.append((index, outcome))
                    else:
                        results[index] = outcome
                hard = [e for _, e in failed if not isinstance(e, TritonUnavailable)]
                if hard:
                    raise hard[0]
            if not failed:
                break
            if attempt == retries:
                raise failed[0][1]
            time.sleep(0.5 * (attempt + 1))
            todo = [i for i, _ in failed]
        return [r for r in results if r is not None]

    def _wave(self, model: str, requests: Sequence[dict[str, np.ndarray]],
              outputs: Sequence[str]) -> list[dict[str, np.ndarray] | TritonClientError]:
        """Issue every request of one wave with async_infer, then collect them all."""
        wanted = [self.module.InferRequestedOutput(name, binary_data=True)
                  if self.endpoint.protocol == "http" else self.module.InferRequestedOutput(name)
                  for name in outputs]
        handles: list[Any] = []
        for request in requests:
            inputs = []
            for name, array in request.items():
                tensor = self.module.InferInput(name, list(array.shape),
                                                NUMPY_TO_TRITON[array.dtype])
                if self.endpoint.protocol == "http":
                    tensor.set_data_from_numpy(array, binary_data=True)
                else:
                    tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            handles.append(self._submit(model, inputs, wanted))
        outcomes: list[dict[str, np.ndarray] | TritonClientError] = []
        for handle in handles:
            try:
                result = self._collect(handle)
                outcomes.append({name: result.as_numpy(name) for name in outputs})
            except TritonClientError as exc:
                outcomes.append(exc)
            except Exception as exc:
                outcomes.append(self.error(exc, model))
        return outcomes

    def _submit(self, model: str, inputs: list[Any], outputs: list[Any]) -> Any:
        if self.endpoint.protocol == "http":
            try:
                return self.client.async_infer(model, inputs, outputs=outputs)
            except Exception as exc:
                return self.error(exc, model)
        box: dict[str, Any] = {}
        done = threading.Event()

        def callback(result: Any, error: Any) -> None:
            box["result"], box["error"] = result, error
            done.set()

        try:
            self.client.async_infer(model, inputs, callback, outputs=outputs,
                                    client_timeout=self.timeout_s)
        except Exception as exc:
            return self.error(exc, model)
        return (box, done, model)

    def _collect(self, handle: Any) -> Any:
        if isinstance(handle, TritonClientError):
            raise handle
        if self.endpoint.protocol == "http":
            return handle.get_result(timeout=self.timeout_s)
        box, done, model = handle
        if not done.wait(self.timeout_s + 5):
            raise TritonTimeout(f"Triton at {self.endpoint} (model {model}): no answer within "
                                f"{self.timeout_s:g} s")
        if box["error"] is not None:
            raise self.error(box["error"], model)
        return box["result"]

    def close(self) -> None:
        self.client.close()


def _shape(values: Sequence[Any]) -> list[int]:
    return [int(v) for v in values]


class TritonPatchRuntime:
    """`PatchRuntime` running the patch graph on a Triton server's `<name>_patch` model.

    The served model is checked against `model_info` (cmc.json) at construction: inputs of
    the mode, patch size and class count must match or TritonModelMismatch is raised. Tiles
    go over the wire in the data type the model declares (FP16 where it allows).
    """

    name: str = Runtime.TRITON
    device = "server"

    def __init__(self, url: str, model_info: ModelInfo, mode: str = Mode.FUSED, *,
                 model_name: str | None = None, timeout_s: float = 60.0, max_in_flight: int = 4,
                 request_batch: int | None = None, retries: int = 2) -> None:
        if mode not in MODE_INPUTS:
            raise ValueError(f"unknown mode {mode!r} (expected one of {sorted(MODE_INPUTS)})")
        self.model = model_name or patch_model_name(model_info.name, mode)
        self.inputs = MODE_INPUTS[mode]
        self.max_in_flight = max_in_flight
        self.retries = retries
        self._conn = TritonConnection(url, timeout_s, concurrency=max_in_flight)
        self._conn.check_ready(self.model)
        meta, config = self._conn.metadata(self.model)
        self.wire_dtypes = self._check(meta, model_info)
        self.outputs = self._offered(meta, model_info, mode)
        served_batch = max(1, int(config.get("max_batch_size", 1)))
        self.request_batch = min(request_batch or served_batch, served_batch)
        self.max_batch = self.request_batch * max_in_flight
        precision = config.get("parameters", {}).get("precision", {}).get("string_value")
        self.precision = str(precision or Precision.FP32)

    def _check(self, meta: dict[str, Any], info: ModelInfo) -> dict[str, np.dtype[Any]]:
        """The wire dtype per input; TritonModelMismatch if the model is not cmc.json's."""
        where = f"{info.root / 'cmc.json'} vs Triton model {self.model}"
        patch = list(info.patch_size)
        inputs = {i["name"]: i for i in meta.get("inputs", [])}
        if set(inputs) != set(self.inputs):
            raise TritonModelMismatch(f"{where}: inputs {sorted(inputs)}, expected "
                                      f"{list(self.inputs)}")
        dtypes: dict[str, np.dtype[Any]] = {}
        for name, spec in inputs.items():
            if _shape(spec["shape"])[1:] != [1, *patch] or spec["datatype"] not in ("FP32", "FP16"):
                raise TritonModelMismatch(f"{where}: input {name} is {spec['datatype']} "
                                          f"{_shape(spec['shape'])}, expected FP32/FP16 "
                                          f"[-1, 1, {', '.join(map(str, patch))}]")
            dtypes[name] = TRITON_TO_NUMPY[spec["datatype"]]
        outputs = {o["name"]: o for o in meta.get("outputs", [])}
        probs = outputs.get("probs")
        expected = [info.num_classes, *patch]
        if probs is None or _shape(probs["shape"])[1:] != expected:
            got = _shape(probs["shape"]) if probs else sorted(outputs)
            raise TritonModelMismatch(f"{where}: output probs is {got}, expected [-1, "
                                      f"{', '.join(map(str, expected))}] "
                                      f"({info.num_classes} classes)")
        return dtypes

    @staticmethod
    def _offered(meta: dict[str, Any], info: ModelInfo, mode: str) -> tuple[str, ...]:
        """`probs` and those of the mode's further outputs (the fused graph's branches) that
        the served model declares with probs's shape; a repository exported before them
        declares `probs` only."""
        shapes = {o["name"]: _shape(o["shape"])[1:] for o in meta.get("outputs", [])}
        expected = [info.num_classes, *info.patch_size]
        return tuple(n for n in MODE_OUTPUTS[mode] if shapes.get(n) == expected)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """probs float32 [N, K, P, P, P] for tiles [N, 1, P, P, P], N <= max_batch."""
        return self.run_outputs(inputs, ("probs",))[0]

    def run_outputs(self, inputs: dict[str, np.ndarray],
                    names: Sequence[str]) -> list[np.ndarray]:
        """The named outputs (float32) of one pass over tiles [N, 1, P, P, P]."""
        n = check_batch(inputs, self.inputs, self.max_batch, self.name)
        check_outputs(names, self.outputs, self.name)
        requests = [{k: np.ascontiguousarray(v[i:i + self.request_batch],
                                             dtype=self.wire_dtypes[k])
                     for k, v in inputs.items()}
                    for i in range(0, n, self.request_batch)]
        results = self._conn.infer_many(self.model, requests, list(names), self.max_in_flight,
                                        self.retries)
        return [np.concatenate([r[name] for r in results]).astype(np.float32, copy=False)
                for name in names]

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class VolumeResult:
    """What the volume model returns: labels uint8 [D, H, W], probs float32 [K, D, H, W]."""

    labels: np.ndarray
    probs: np.ndarray | None


class TritonVolumeClient:
    """Whole-volume segmentation on the server (`<name>` model: server-side tiling)."""

    def __init__(self, url: str, model_name: str = "cmc", *, timeout_s: float = 600.0,
                 retries: int = 2) -> None:
        self.model = model_name
        self.retries = retries
        self._conn = TritonConnection(url, timeout_s, concurrency=1)
        self._conn.check_ready(model_name)
        meta, _ = self._conn.metadata(model_name)
        self.wire_dtypes = {i["name"]: TRITON_TO_NUMPY.get(i["datatype"], np.dtype(np.float32))
                            for i in meta.get("inputs", [])}

    def segment(self, image_a: np.ndarray | None = None, image_b: np.ndarray | None = None,
                *, probs: bool = False) -> VolumeResult:
        """Labels (and probabilities) of a pre-processed [D, H, W] volume pair or single image.

        The images given choose the mode: both -> fused, one -> that modality.
        """
        request = {}
        for name, image in (("image_a", image_a), ("image_b", image_b)):
            if image is None:
                continue
            if name not in self.wire_dtypes:
                raise TritonModelMismatch(f"Triton model {self.model} has no input {name}")
            array = np.asarray(image)
            if array.ndim != 3:
                raise ValueError(f"{name} must be a [D, H, W] volume, got shape {array.shape}")
            request[name] = np.ascontiguousarray(array[None], dtype=self.wire_dtypes[name])
        if not request:
            raise ValueError("give image_a and/or image_b")
        outputs = ["labels", "probs"] if probs else ["labels"]
        (result,) = self._conn.infer_many(self.model, [request], outputs, 1, self.retries)
        return VolumeResult(labels=result["labels"][0],
                            probs=result["probs"][0].astype(np.float32) if probs else None)

    def close(self) -> None:
        self._conn.close()

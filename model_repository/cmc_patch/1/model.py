"""Triton python-backend model `<name>_patch`: one exported patch graph, batched.

Serves `image_a` / `image_b` [N, 1, P, P, P] (FP16 or FP32, as the config declares) ->
`probs` [N, K, P, P, P] (FP32 or FP16, as declared), and every further output the config
declares (the fused graph's `probs_a` / `probs_b`, which quality control reads). The graph
runs in the server venv with
cmc's own patch runtimes (`cmc_serve.runtimes`: ONNX Runtime or OpenVINO), so Triton and
`cmc segment` execute the same graph the same way; the server venv has cmc installed
without dependencies (`python -m cmc_serve.triton.setup`).

config.pbtxt `parameters` (string values):
  graph      path of the .onnx / .xml graph, relative to this model's folder or absolute
  runtime    onnxruntime (default) | openvino
  precision  fp32 (default) | fp16 | bf16 (bf16: OpenVINO inference-precision hint) | int8
             (`graph` is an int8 IR) | auto (the fastest of `gated_precisions`,
             comma-separated, that this server's CPU runs natively, int8 where measured
             faster: `cmc_serve.runtimes.precision`, as `cmc segment` chooses)
  int8_graph the gated int8 IR beside an auto `graph`, relative like `graph`
The dynamic batcher hands us several requests at once: their tiles are concatenated, run in
chunks of at most `max_batch_size`, and the probabilities are split back per request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from cmc_common.contract import AUTO
from cmc_serve.runtimes.onnxruntime_rt import OnnxRuntimeRuntime
from cmc_serve.runtimes.openvino_rt import OpenVinoRuntime
from cmc_serve.runtimes.precision import INT8, choose_precision, measure_tile_seconds

# The runtimes a python-backend patch model can run its graph on.
PATCH_RUNTIMES: dict[str, Any] = {"onnxruntime": OnnxRuntimeRuntime, "openvino": OpenVinoRuntime}


def parameter(config: dict[str, Any], key: str, default: str | None = None) -> str:
    """A string parameter of config.pbtxt; a missing required one is a load error."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    if value is None:
        raise pb_utils.TritonModelException(
            f"{config.get('name')}: config.pbtxt lacks parameter {key!r}")
    return str(value)


class TritonPythonModel:
    """Loads the graph once per model instance and runs each batch of requests through it."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        runtime = parameter(config, "runtime", "onnxruntime")
        if runtime not in PATCH_RUNTIMES:
            raise pb_utils.TritonModelException(
                f"{self.name}: runtime {runtime!r} is not one of {sorted(PATCH_RUNTIMES)}")
        graph = Path(args["model_repository"]) / parameter(config, "graph")
        if not graph.is_file():
            raise pb_utils.TritonModelException(f"{self.name}: graph file {graph} does not exist")
        self.inputs = tuple(i["name"] for i in config["input"])
        # output name -> numpy dtype, `probs` first (the runtime's main output)
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                        for o in config["output"]}
        self.max_batch = max(1, int(config.get("max_batch_size", 0)))
        precision = parameter(config, "precision", "fp32")
        if precision == AUTO:
            precision, graph = self._choose(config, runtime, graph, Path(args["model_repository"]))
        self.runtime = PATCH_RUNTIMES[runtime](graph, inputs=self.inputs,
                                               output=next(iter(self.outputs)),
                                               precision=precision, max_batch=self.max_batch)
        missing = [n for n in self.outputs if n not in self.runtime.outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{self.name}: graph {graph.name} has no output {missing} (it has "
                f"{list(self.runtime.outputs)})")

    def _choose(self, config: dict[str, Any], runtime: str, graph: Path,
                folder: Path) -> tuple[str, Path]:
        """Precision auto, as `cmc segment` chooses (`cmc_serve.runtimes.precision`): the
        rule among `gated_precisions`, and int8 (its IR in `int8_graph`) where timing a few
        tiles on this server's CPU finds it faster. Returns the precision and its graph."""
        graphs = dict.fromkeys(parameter(config, "gated_precisions", "fp32").split(","), graph)
        graphs.pop(INT8, None)
        int8 = parameter(config, "int8_graph", "")
        if int8:
            graphs[INT8] = folder / int8
        patch = [int(d) for d in config["input"][0]["dims"]][1:]

        def measure(precisions: Any) -> dict[str, float]:
            return measure_tile_seconds(
                lambda p: PATCH_RUNTIMES[runtime](graphs[p], inputs=self.inputs,
                                                  output=next(iter(self.outputs)),
                                                  precision=p, max_batch=self.max_batch),
                precisions, self.inputs, patch)

        choice = choose_precision(runtime, "cpu", graphs, measure)
        pb_utils.Logger.log_info(f"{self.name}: precision {choice.reason}")
        return choice.precision, graphs[choice.precision]

    def execute(self, requests: list[Any]) -> list[Any]:
        # Only the outputs some request asked for are fetched, converted and sent: a client
        # segmenting wants `probs`, and the branches would triple the bytes each pass copies.
        wanted = [self._requested(request) for request in requests]
        try:
            sizes, feeds = self._gather(requests)
            results = self._run(feeds, tuple(n for n in self.outputs
                                             if any(n in w for w in wanted)))
        except Exception as exc:  # reported per request; the model stays loaded
            error = pb_utils.TritonError(f"{self.name}: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        bounds = np.cumsum(sizes)[:-1]
        per_output = {name: np.split(array, bounds) for name, array in results.items()}
        return [pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, parts[i].astype(self.outputs[name], copy=False))
                    for name, parts in per_output.items() if name in wanted[i]])
                for i in range(len(sizes))]

    def _requested(self, request: Any) -> set[str]:
        """The declared outputs `request` asked for (every one where it named none)."""
        names = set(request.requested_output_names()) & set(self.outputs)
        return names or set(self.outputs)

    def _gather(self, requests: list[Any]) -> tuple[list[int], dict[str, np.ndarray]]:
        """Concatenate every request's tiles per input (float32, what the runtimes take)."""
        per_input: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            batch = None
            for name in self.inputs:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                per_input[name].append(array.astype(np.float32, copy=False))
                batch = array.shape[0]
            sizes.append(int(batch or 0))
        return sizes, {name: np.concatenate(parts) for name, parts in per_input.items()}

    def _run(self, feeds: dict[str, np.ndarray],
             names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The `names` outputs of the tiles, run in chunks of at most max_batch."""
        total = next(iter(feeds.values())).shape[0]
        chunks = [self.runtime.run_outputs({k: v[i:i + self.max_batch] for k, v in feeds.items()},
                                           names)
                  for i in range(0, total, self.max_batch)]
        return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(names)}

    def finalize(self) -> None:
        self.runtime.close()

"""Patch runtimes: one exported patch graph behind a uniform `run(inputs) -> probs` call.

The runtime back-ends (onnxruntime, openvino, tensorrt) are imported only when opened, so
importing this package needs none of them.
"""

from cmc_serve.errors import RuntimeUnavailable
from cmc_serve.runtimes.base import PatchRuntime
from cmc_serve.runtimes.select import open_runtime

__all__ = ["PatchRuntime", "RuntimeUnavailable", "open_runtime"]

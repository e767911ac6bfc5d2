"""Half precision emulated in an fp32 ONNX graph, so the precision gates can be checked anywhere.

OpenVINO's bf16 / fp16 kernels exist only on CPUs with native support (AMX / AVX512-BF16,
AVX512-FP16); elsewhere every half-precision branch of the export would run only as
"unavailable". `emulate` rewrites an fp32 graph so that each weight and each activation is
rounded to bf16 or fp16 and computed on in fp32 (what a half-precision kernel does when it
accumulates in fp32), which ONNX Runtime runs on every CPU. Its errors are at least those of
a native graph: OpenVINO keeps normalisations and softmax in fp32, the emulation rounds
their outputs too.

`copy_model` and `insert_after` are the graph edits this rewrite is made of; the faults the
gates must refuse (`fault_injection`) are built with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cmc_common.contract import Precision

HALF_TYPES: dict[str, int] = {Precision.BF16: TensorProto.BFLOAT16,
                              Precision.FP16: TensorProto.FLOAT16}


def round_to(array: np.ndarray, precision: str) -> np.ndarray:
    """`array` (float32) rounded to the nearest bf16 / fp16 value, returned as float32."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if precision == Precision.FP16:
        return array.astype(np.float16).astype(np.float32)
    if precision != Precision.BF16:
        raise ValueError(f"unknown half precision {precision!r}; expected one of {list(HALF_TYPES)}")
    bits = array.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(array), out, array)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of `model`: the rewrites never change the graph they were given."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _float_outputs(model: onnx.ModelProto) -> set[str]:
    """Names of the float tensors that nodes produce (shape inference gives their types)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v.type.tensor_type.elem_type for v in
             (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    return {name for node in model.graph.node for name in node.output
            if typed.get(name) == TensorProto.FLOAT}


def insert_after(model: onnx.ModelProto, tensor: str, new_nodes: Sequence[onnx.NodeProto],
            new_name: str) -> None:
    """Insert `new_nodes` (which read `tensor` and write `new_name`) right after `tensor`'s
    producer; every other consumer of `tensor` then reads `new_name`."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new_name if name == tensor else name for name in node.input]
    producer = next((i for i, n in enumerate(graph.node) if tensor in n.output), -1)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(producer + 1 + offset, node)


def emulate(model: onnx.ModelProto, precision: str,
            fp32_ops: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy of fp32 `model` whose weights and activations are rounded to `precision`.

    The outputs of `fp32_ops` (e.g. normalisations, Softmax) stay in fp32, as OpenVINO and
    the fp16 converter keep them.
    """
    if precision not in HALF_TYPES:
        raise ValueError(f"unknown half precision {precision!r}; expected one of {list(HALF_TYPES)}")
    out = copy_model(model)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(round_to(numpy_helper.to_array(init), precision),
                                                  init.name))
    kept = {name for node in out.graph.node if node.op_type in fp32_ops for name in node.output}
    graph_outputs = {o.name for o in out.graph.output}
    for index, tensor in enumerate(sorted(_float_outputs(out) - graph_outputs - kept)):
        half, back = f"{tensor}__{precision}", f"{tensor}__{precision}_f32"
        insert_after(out, tensor, [
            helper.make_node("Cast", [tensor], [half], to=HALF_TYPES[precision],
                             name=f"emulate_{precision}_{index}"),
            helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT,
                             name=f"emulate_{precision}_{index}_back")], back)
    return out

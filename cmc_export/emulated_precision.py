"""Half precision emulated in an fp32 ONNX graph, so the precision gates can be checked anywhere.

OpenVINO's bf16 / fp16 kernels exist only on CPUs with native support (AMX / AVX512-BF16,
AVX512-FP16); elsewhere every half-precision branch of the export would run only as
"unavailable". `emulate` rewrites an fp32 graph so that each weight and each activation is
rounded to bf16 or fp16 and computed on in fp32 (what a half-precision kernel does when it
accumulates in fp32), which ONNX Runtime runs on every CPU. Its errors are at least those of
a native graph: OpenVINO keeps normalisations and softmax in fp32, the emulation rounds
their outputs too.

`inject` adds the faults a broken conversion produces (a non-finite activation, a layer
computed wrongly, swapped inputs, one class biased), so that tests and
`bench/gate_calibration.py` can show the gates refusing them on any host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF_TYPES = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}
FAULTS = ("nan", "overflow", "wrong_layer", "swapped_inputs", "class_bias")


def round_to(array: np.ndarray, precision: str) -> np.ndarray:
    """`array` (float32) rounded to the nearest bf16 / fp16 value, returned as float32."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if precision == "fp16":
        return array.astype(np.float16).astype(np.float32)
    if precision != "bf16":
        raise ValueError(f"unknown half precision {precision!r}; expected one of {list(HALF_TYPES)}")
    bits = array.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(array), out, array)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
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


def _rewire(model: onnx.ModelProto, tensor: str, new_nodes: Sequence[onnx.NodeProto],
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
    out = _copy(model)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(round_to(numpy_helper.to_array(init), precision),
                                                  init.name))
    kept = {name for node in out.graph.node if node.op_type in fp32_ops for name in node.output}
    graph_outputs = {o.name for o in out.graph.output}
    for index, tensor in enumerate(sorted(_float_outputs(out) - graph_outputs - kept)):
        half, back = f"{tensor}__{precision}", f"{tensor}__{precision}_f32"
        _rewire(out, tensor, [
            helper.make_node("Cast", [tensor], [half], to=HALF_TYPES[precision],
                             name=f"emulate_{precision}_{index}"),
            helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT,
                             name=f"emulate_{precision}_{index}_back")], back)
    return out


def _middle(model: onnx.ModelProto, op_types: Sequence[str]) -> onnx.NodeProto:
    """The middle one of the graph's nodes of `op_types` (a layer deep inside the network)."""
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    return nodes[len(nodes) // 2]


def _redirect_output(model: onnx.ModelProto) -> tuple[str, str]:
    """Let the graph's output node write `<output>__raw`; return (raw name, output name)."""
    output = model.graph.output[0].name
    raw = f"{output}__raw"
    for node in model.graph.node:
        node.output[:] = [raw if n == output else n for n in node.output]
    return raw, output


def inject(model: onnx.ModelProto, fault: str, class_index: int = 1,
           bias: float = 1.0) -> onnx.ModelProto:
    """A copy of `model` with one deliberate fault (see FAULTS).

    nan: the probabilities become NaN where the first input is positive; overflow: a middle
    layer's activations are multiplied by 1e38 (inf, as an fp16 overflow gives);
    wrong_layer: a middle convolution's weights are sign-flipped; swapped_inputs: a two-input
    graph reads image_b as image_a and vice versa; class_bias: the probability of class
    `class_index` is scaled by exp(-bias) and the rest renormalised (a logit shift of -bias).
    """
    out = _copy(model)
    graph = out.graph
    initializers = {i.name: i for i in graph.initializer}
    if fault == "wrong_layer":
        conv = _middle(out, ("Conv", "ConvTranspose"))
        weight = initializers[conv.input[1]]
        weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
        return out
    if fault == "swapped_inputs":
        names = [i.name for i in graph.input]
        if len(names) != 2:
            raise ValueError("swapped_inputs needs a two-input (fused) graph")
        a, b = names
        for node in graph.node:
            node.input[:] = [{a: b, b: a}.get(n, n) for n in node.input]
        return out
    if fault == "overflow":
        layer = _middle(out, ("Conv",)).output[0]
        graph.initializer.append(numpy_helper.from_array(np.array(1e38, np.float32), "fault_scale"))
        _rewire(out, layer, [helper.make_node("Mul", [layer, "fault_scale"], ["fault_inf"])],
                "fault_inf")
        return out
    raw, output = _redirect_output(out)
    if fault == "nan":
        graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "fault_zero"),
                                  numpy_helper.from_array(np.array(np.nan, np.float32), "fault_nan")])
        graph.node.extend([
            helper.make_node("Greater", [graph.input[0].name, "fault_zero"], ["fault_mask"]),
            helper.make_node("Where", ["fault_mask", "fault_nan", raw], [output])])
    elif fault == "class_bias":
        classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
        weights = np.ones((1, classes, 1, 1, 1), np.float32)
        weights[0, class_index] = np.exp(-bias)
        graph.initializer.append(numpy_helper.from_array(weights, "fault_weights"))
        graph.node.extend([
            helper.make_node("Mul", [raw, "fault_weights"], ["fault_scaled"]),
            helper.make_node("ReduceSum", ["fault_scaled", "fault_axis"], ["fault_sum"],
                             keepdims=1),
            helper.make_node("Div", ["fault_scaled", "fault_sum"], [output])])
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "fault_axis"))
    else:
        raise ValueError(f"unknown fault {fault!r}; expected one of {list(FAULTS)}")
    return out

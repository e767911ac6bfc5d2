"""Deliberate faults in an ONNX graph: what a broken conversion produces, made on purpose.

The export's precision gates (`cmc_export.gates`) must refuse a graph whose probabilities are
wrong, on every host, including hosts without native half precision. `inject` builds such a
graph from a good one (a non-finite activation, a layer computed wrongly, swapped inputs,
one class biased) so that tests/test_gates.py and `bench/gate_calibration.py` can show each
fault refused; applied to an `emulated_precision.emulate`d graph it runs on any CPU. Not used
by the export itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cmc_export.emulated_precision import copy_model, insert_after

FAULTS = ("nan", "overflow", "wrong_layer", "swapped_inputs", "class_bias")


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
    out = copy_model(model)
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
        insert_after(out, layer, [helper.make_node("Mul", [layer, "fault_scale"], ["fault_inf"])],
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

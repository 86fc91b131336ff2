"""Synthetic graphs for the zoo: the weight layouts real exporters produce, each in a small model built with
``onnx.helper`` (random weights, seeded).

Every builder returns ``(model, feeds)``; :data:`SYNTHETIC` maps a zoo name to its builder. The cases: weights as
``Constant`` nodes; weights used inside ``If``/``Loop`` bodies (an outer-scope initializer also read by a
main-graph MatMul, and a Constant inside the branch); one weight shared by two MatMuls; one weight read as
``MatMul(x, W)`` and as ``Gemm(z, W, transB=1)``; a weight that is also a graph output; a left-operand weight
(``W @ x``); Gemm with transA/transB/alpha/beta; Conv1d (stride, dilation); grouped Conv; depthwise Conv whose
channels are one-signed; ConvTranspose; 3-D batched MatMul weights; activations with unnamed dims; a batch declared
as ``dim_value -1`` (paddle2onnx); initializers also listed as graph inputs (IR 3); opset 13 and 23.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
Feeds = dict[str, np.ndarray]
BATCH = 8


class _Builder:
    """Collects nodes and initializers of one graph; random weights come from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        """A float32 initializer ``N(0, 1/fan_in)`` (fan_in = product of all but the first axis)."""
        self.inits.append(numpy_helper.from_array(self.array(shape, scale), name))
        return name

    def array(self, shape: tuple[int, ...], scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (self.rng.standard_normal(shape) * (scale or fan_in**-0.5)).astype(np.float32)

    def constant(self, name: str, value: np.ndarray) -> str:
        self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/Constant",
                                           value=numpy_helper.from_array(value, name)))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def model(self, inputs: dict[str, list], outputs: list[str] | dict[str, list], opset: int = 17, ir: int = 8,
              initializers_as_inputs: bool = False) -> onnx.ModelProto:
        """The checked model; output shapes are inferred unless ``outputs`` maps names to shapes."""
        given = outputs if isinstance(outputs, dict) else {}
        graph_inputs = [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs.items()]
        if initializers_as_inputs:
            graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, "zoo", graph_inputs,
                                  [helper.make_tensor_value_info(name, FLOAT, given.get(name)) for name in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxq-zoo")
        model.ir_version = ir
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
        shapes = {value.name: value for value in [*inferred.value_info, *inferred.output]}
        shapes |= {t.name: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits}
        for output in model.graph.output:
            known = shapes.get(output.name)
            if output.name not in given and known is not None and known.type.tensor_type.HasField("shape"):
                output.CopyFrom(known)
        onnx.checker.check_model(model, full_check=True)
        return model


def _normal(seed: int, **shapes: tuple[int, ...]) -> Feeds:
    rng = np.random.default_rng(1000 + seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def constant_weights() -> tuple[onnx.ModelProto, Feeds]:
    """MatMul, Gemm and Conv whose weights are ``Constant`` nodes (as Paddle and optimum exports have), opset 13."""
    b = _Builder(1)
    h = b.node("MatMul", ["x", b.constant("w1", b.array((64, 96)))], "mm")
    h = b.node("Relu", [h], "relu")
    h = b.node("Gemm", [h, b.constant("w2", b.array((48, 96))), b.constant("c2", b.array((48,), 0.1))], "gemm",
               transB=1)
    c = b.node("Conv", ["image", b.constant("k", b.array((16, 8, 3, 3)))], "conv", pads=[1, 1, 1, 1])
    return b.model({"x": ["M", 64], "image": ["N", 8, 12, 12]}, [h, c], opset=13), _normal(
        1, x=(BATCH, 64), image=(BATCH, 8, 12, 12))


def if_branches() -> tuple[onnx.ModelProto, Feeds]:
    """``If``: the then-branch reads an outer-scope initializer, the else-branch a Constant defined inside it; the
    main graph also reads the outer initializer (``y_main = x @ W``), so that layer is quantized and the branches
    must keep reading the float weight."""
    b = _Builder(2)
    outer = b.weight("w_outer", (64, 48))
    b.node("MatMul", ["x", outer], "y_main")
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", outer], ["y_then"], name="then/MatMul")],
                                   "then", [], [helper.make_tensor_value_info("y_then", FLOAT, None)])
    inner = _Builder(3)
    inner.node("MatMul", ["x", inner.constant("w_inner", inner.array((64, 48)))], "else/MatMul")
    else_graph = helper.make_graph(inner.nodes, "else", [],
                                   [helper.make_tensor_value_info("else/MatMul", FLOAT, None)])
    flag = b.node("ReduceSum", ["x"], "sum", keepdims=0)
    flag = b.node("Greater", [flag, b.constant("zero", np.array(0.0, np.float32))], "positive")
    b.node("If", [flag], "y", then_branch=then_graph, else_branch=else_graph)
    model = b.model({"x": ["M", 64]}, ["y", "y_main"])
    feeds = _normal(2, x=(BATCH, 64))
    return model, feeds


def loop_body() -> tuple[onnx.ModelProto, Feeds]:
    """``Loop`` (3 trips) whose body computes ``h ← tanh(h @ W)`` with ``W`` an outer-scope initializer, started
    from ``h₀ = x @ W`` in the main graph (quantized; the body keeps the float ``W``)."""
    b = _Builder(4)
    w = b.weight("w_loop", (32, 32), scale=1.5 / np.sqrt(32))
    start = b.node("MatMul", ["x", w], "h0")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", w], ["h_mm"], name="body/MatMul"),
         helper.make_node("Tanh", ["h_mm"], ["h_out"], name="body/Tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", FLOAT, ["M", 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", FLOAT, ["M", 32])],
    )
    trips = b.constant("trips", np.array(3, np.int64))
    keep = b.constant("keep", np.array(True))
    b.node("Loop", [trips, keep, start], "y", body=body)
    return b.model({"x": ["M", 32]}, {"y": ["M", 32]}), _normal(4, x=(BATCH, 32))


def shared_two_matmuls() -> tuple[onnx.ModelProto, Feeds]:
    """One weight ``W [64, 48]`` read by two MatMuls on different inputs."""
    b = _Builder(5)
    w = b.weight("w_shared", (64, 48))
    b.node("MatMul", ["x", w], "y1")
    b.node("MatMul", ["z", w], "y2")
    return b.model({"x": ["M", 64], "z": ["M", 64]}, ["y1", "y2"]), _normal(5, x=(BATCH, 64), z=(BATCH, 64))


def shared_matmul_gemm() -> tuple[onnx.ModelProto, Feeds]:
    """One weight ``W [64, 48]`` read as ``MatMul(x, W)`` (K=64) and as ``Gemm(z, W, transB=1)`` (K=48)."""
    b = _Builder(6)
    w = b.weight("w_both", (64, 48))
    b.node("MatMul", ["x", w], "y_matmul")
    b.node("Gemm", ["z", w], "y_gemm", transB=1)
    return b.model({"x": ["M", 64], "z": ["M", 48]}, ["y_matmul", "y_gemm"]), _normal(
        6, x=(BATCH, 64), z=(BATCH, 48))


def weight_is_output() -> tuple[onnx.ModelProto, Feeds]:
    """``y = x @ W`` where ``W`` is also a graph output (the model returns its own weight)."""
    b = _Builder(7)
    w = b.weight("w_out", (64, 48))
    b.node("MatMul", ["x", w], "y")
    return b.model({"x": ["M", 64]}, {"y": ["M", 48], w: [64, 48]}), _normal(7, x=(BATCH, 64))


def left_operand() -> tuple[onnx.ModelProto, Feeds]:
    """``y = W @ x`` with constant ``W [48, 64]`` and ``x [B, 64, 10]``."""
    b = _Builder(8)
    b.node("MatMul", [b.weight("w_left", (48, 64)), "x"], "y")
    return b.model({"x": ["B", 64, 10]}, ["y"]), _normal(8, x=(BATCH, 64, 10))


def gemm_variants() -> tuple[onnx.ModelProto, Feeds]:
    """Gemm with transB=1, alpha 0.5, beta 2 and a bias; transB=0, alpha 1.5; transA=1 (input given as [K, M])."""
    b = _Builder(9)
    b.node("Gemm", ["x", b.weight("w_tb", (48, 64)), b.weight("c_tb", (48,), 0.5)], "y_transb",
           transB=1, alpha=0.5, beta=2.0)
    b.node("Gemm", ["x", b.weight("w_n", (64, 40))], "y_plain", alpha=1.5)
    b.node("Gemm", ["xt", b.weight("w_ta", (64, 32)), b.weight("c_ta", (1, 32), 0.5)], "y_transa", transA=1)
    return b.model({"x": ["M", 64], "xt": [64, "M"]}, ["y_transb", "y_plain", "y_transa"]), _normal(
        9, x=(BATCH, 64), xt=(64, BATCH))


def conv1d() -> tuple[onnx.ModelProto, Feeds]:
    """Conv1d ``[32, 16, 5]`` with stride 2, dilation 2, padding 4, bias."""
    b = _Builder(10)
    b.node("Conv", ["x", b.weight("k1d", (32, 16, 5)), b.weight("b1d", (32,), 0.1)], "y",
           strides=[2], dilations=[2], pads=[4, 4])
    return b.model({"x": ["N", 16, 40]}, ["y"]), _normal(10, x=(BATCH, 16, 40))


def grouped_conv() -> tuple[onnx.ModelProto, Feeds]:
    """Conv 3×3 with 4 groups (``[32, 4, 3, 3]`` on 16 channels)."""
    b = _Builder(11)
    b.node("Conv", ["x", b.weight("kg", (32, 4, 3, 3))], "y", group=4, pads=[1, 1, 1, 1])
    return b.model({"x": ["N", 16, 10, 10]}, ["y"]), _normal(11, x=(BATCH, 16, 10, 10))


def depthwise_one_signed() -> tuple[onnx.ModelProto, Feeds]:
    """Depthwise 3×3 Conv whose 24 channels are each all-positive or all-negative (as in MobileNet-style exports),
    then a pointwise Conv: per-channel groups that do not contain 0."""
    b = _Builder(12)
    magnitude = np.abs(b.array((24, 1, 3, 3), scale=0.3)) + 0.05
    signs = np.where(np.arange(24) % 3 == 0, -1.0, 1.0).astype(np.float32).reshape(24, 1, 1, 1)
    b.inits.append(numpy_helper.from_array((magnitude * signs).astype(np.float32), "k_dw"))
    h = b.node("Conv", ["x", "k_dw"], "depthwise", group=24, pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], "relu")
    b.node("Conv", [h, b.weight("k_pw", (16, 24, 1, 1))], "pointwise")
    return b.model({"x": ["N", 24, 12, 12]}, ["pointwise"]), _positive(12, x=(BATCH, 24, 12, 12))


def _positive(seed: int, **shapes: tuple[int, ...]) -> Feeds:
    """Image-like inputs in [0, 1] (post-ReLU / normalised pixels), so one-signed kernels give one-signed sums."""
    return {name: np.abs(value) for name, value in _normal(seed, **shapes).items()}


def conv_transpose() -> tuple[onnx.ModelProto, Feeds]:
    """Conv 3×3, then ConvTranspose 4×4 stride 2 (weight ``[16, 8, 4, 4]``, upsampling, as in PP-OCR's detector)."""
    b = _Builder(13)
    h = b.node("Conv", ["x", b.weight("kc", (16, 16, 3, 3))], "conv", pads=[1, 1, 1, 1])
    b.node("ConvTranspose", [h, b.weight("kt", (16, 8, 4, 4))], "y", strides=[2, 2], pads=[1, 1, 1, 1])
    return b.model({"x": ["N", 16, 8, 8]}, ["y"]), _normal(13, x=(BATCH, 16, 8, 8))


def batched_matmul_3d() -> tuple[onnx.ModelProto, Feeds]:
    """``h = x @ W`` with a 3-D weight ``W [4, 32, 24]`` (one matrix per head) and ``x [4, M, 32]``, then an ordinary
    ``h @ V`` with ``V [24, 16]``."""
    b = _Builder(14)
    h = b.node("MatMul", ["x", b.weight("w3d", (4, 32, 24))], "heads")
    b.node("MatMul", [h, b.weight("v2d", (24, 16))], "y")
    return b.model({"x": [4, "M", 32]}, ["y"]), _normal(14, x=(4, BATCH, 32))


def unnamed_dims() -> tuple[onnx.ModelProto, Feeds]:
    """A MatMul whose input dims are unknown and unnamed (after a Reshape to a runtime shape), followed by the
    ``Shape → Gather → Concat([b, -1, 4, 12]) → Reshape`` head split that optimum's BERT/Llama exports contain."""
    b = _Builder(18)
    runtime_shape = b.node("Max", [b.node("Shape", ["x"], "x_shape")] * 2, "runtime_shape")  # not propagated
    h = b.node("Reshape", ["x", runtime_shape], "flat")
    h = b.node("MatMul", [h, b.weight("wq", (64, 48))], "query")
    shape = b.node("Shape", [h], "query_shape")
    batch = b.node("Gather", [shape, b.constant("zero", np.array(0, np.int64))], "batch", axis=0)
    batch = b.node("Unsqueeze", [batch, b.constant("axis0", np.array([0], np.int64))], "batch_1d")
    target = b.node("Concat", [batch, b.constant("rest", np.array([-1, 4, 12], np.int64))], "heads_shape", axis=0)
    b.node("Reshape", [h, target], "heads")
    return b.model({"x": ["B", "S", 64]}, {"heads": ["B", "S", 4, 12]}), _normal(18, x=(BATCH, 5, 64))


def initializers_as_inputs() -> tuple[onnx.ModelProto, Feeds]:
    """IR 3 / opset 9 style: every initializer is also listed as a graph input (Gemm, then MatMul)."""
    b = _Builder(15)
    h = b.node("Gemm", ["x", b.weight("fc1_w", (48, 64)), b.weight("fc1_b", (48,), 0.1)], "fc1", transB=1)
    h = b.node("Relu", [h], "relu")
    b.node("MatMul", [h, b.weight("fc2_w", (48, 32))], "fc2")
    return b.model({"x": ["M", 64]}, ["fc2"], opset=9, ir=3, initializers_as_inputs=True), _normal(
        15, x=(BATCH, 64))


def negative_dims() -> tuple[onnx.ModelProto, Feeds]:
    """paddle2onnx style: the dynamic batch is declared as ``dim_value: -1`` (not a symbol); MatMul then Gemm."""
    b = _Builder(19)
    h = b.node("MatMul", ["x", b.weight("w1", (64, 48))], "fc1")
    h = b.node("Relu", [h], "relu")
    b.node("Gemm", [h, b.weight("w2", (32, 48))], "fc2", transB=1)
    return b.model({"x": [-1, 64]}, {"fc2": [-1, 32]}), _normal(19, x=(BATCH, 64))


def _mlp(opset: int, seed: int) -> tuple[onnx.ModelProto, Feeds]:
    b = _Builder(seed)
    h = b.node("MatMul", ["x", b.weight("w1", (64, 128))], "fc1")
    h = b.node("Add", [h, b.weight("b1", (128,), 0.1)], "fc1_bias")
    h = b.node("Relu", [h], "relu")
    h = b.node("Gemm", [h, b.weight("w2", (32, 128)), b.weight("b2", (32,), 0.1)], "fc2", transB=1)
    c = b.node("Conv", ["image", b.weight("k", (8, 3, 3, 3)), b.weight("kb", (8,), 0.1)], "conv", pads=[1, 1, 1, 1])
    return b.model({"x": ["M", 64], "image": ["N", 3, 16, 16]}, [h, c], opset=opset), _normal(
        seed, x=(BATCH, 64), image=(BATCH, 3, 16, 16))


def opset13() -> tuple[onnx.ModelProto, Feeds]:
    """MatMul+Add, Gemm and Conv at opset 13."""
    return _mlp(13, 16)


def opset23() -> tuple[onnx.ModelProto, Feeds]:
    """The same layers at opset 23 (IR 11 era: above the qdq format's opset 21)."""
    return _mlp(23, 17)


SYNTHETIC: dict[str, Callable[[], tuple[onnx.ModelProto, Feeds]]] = {
    "constant-weights": constant_weights,
    "if-branches": if_branches,
    "loop-body": loop_body,
    "shared-two-matmuls": shared_two_matmuls,
    "shared-matmul-gemm": shared_matmul_gemm,
    "weight-is-output": weight_is_output,
    "left-operand": left_operand,
    "gemm-variants": gemm_variants,
    "conv1d": conv1d,
    "grouped-conv": grouped_conv,
    "depthwise-one-signed": depthwise_one_signed,
    "conv-transpose": conv_transpose,
    "batched-matmul-3d": batched_matmul_3d,
    "initializers-as-inputs": initializers_as_inputs,
    "unnamed-dims": unnamed_dims,
    "negative-dims": negative_dims,
    "opset13": opset13,
    "opset23": opset23,
}

"""Tiny ONNX graphs for tests: MatMul (both sides, through Transpose), Gemm, Conv, deep and residual stacks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def matmul_model(k: int, n: int, seed: int = 0, dtype=np.float32, transpose: bool = False, rank: int = 2):
    """Y = X·B with B [K, N] (or X·Transpose(W) with W [N, K])."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = rng.standard_normal((n, k) if transpose else (k, n)).astype(dtype)
    shape = ["B", "S", k] if rank == 3 else ["M", k]
    out_shape = shape[:-1] + [n]
    nodes = [helper.make_node("MatMul", ["x", "wt" if transpose else "w"], ["y"], name="mm")]
    if transpose:
        nodes.insert(0, helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="tr"))
    return _model(nodes, [helper.make_tensor_value_info("x", elem, shape)],
                  [helper.make_tensor_value_info("y", elem, out_shape)], [numpy_helper.from_array(w, "w")])


def left_matmul_model(k: int, n: int, cols: int = 5, seed: int = 0):
    """Y = A·X with constant A [N, K] and X [B, K, cols]."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["a", "x"], ["y"], name="mm_left")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k, cols])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n, cols])],
                  [numpy_helper.from_array(a, "a")])


def gemm_model(k: int, n: int, trans_b: int, seed: int = 0, alpha: float = 1.0, beta: float = 1.0, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)


def conv_model(cin: int, cout: int, kernel: tuple[int, ...], group: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin // group, *kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    spatial = [9] * len(kernel)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group,
                              pads=[k // 2 for k in kernel] * 2)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, *spatial])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, *spatial])],
                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])


def deep_model() -> onnx.ModelProto:
    """Four MatMul+Relu layers and a conv head: several keys with different sizes."""
    rng = np.random.default_rng(9)
    widths = [16, 24, 32, 24, 16]
    inits, nodes, current = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array((rng.standard_normal((widths[i], widths[i + 1])) / 4).astype(np.float32),
                                             f"W{i}"))
        nodes += [
            helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"], name=f"mm{i}"),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        current = f"r{i}"
    inits.append(numpy_helper.from_array(np.array([0, 1, 4, 4], dtype=np.int64), "shape"))
    inits.append(numpy_helper.from_array(rng.standard_normal((3, 1, 3, 3)).astype(np.float32), "Wc"))
    nodes += [
        helper.make_node("Reshape", [current, "shape"], ["img"]),
        helper.make_node("Conv", ["img", "Wc"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 4, 4])], inits)


def residual_model(width: int = 24, blocks: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A residual stream through ``blocks`` blocks ``h ← h + W2·relu(W1a·h ⊙ W1b·h)`` (W1a, W1b read one tensor),
    with a mask-like tensor computed once from the input and used by every block, and a float head."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")]
    nodes = [helper.make_node("Mul", ["x", "half"], ["scale"], name="shared"),
             helper.make_node("Identity", ["x"], ["h0"])]
    for b in range(blocks):
        for name in ("a", "b", "o"):
            w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"W{b}{name}"))
        nodes += [
            helper.make_node("Mul", [f"h{b}", "scale"], [f"n{b}"], name=f"norm{b}"),
            helper.make_node("MatMul", [f"n{b}", f"W{b}a"], [f"a{b}"], name=f"mm{b}a"),
            helper.make_node("MatMul", [f"n{b}", f"W{b}b"], [f"b{b}"], name=f"mm{b}b"),
            helper.make_node("Mul", [f"a{b}", f"b{b}"], [f"p{b}"]),
            helper.make_node("Relu", [f"p{b}"], [f"r{b}"]),
            helper.make_node("MatMul", [f"r{b}", f"W{b}o"], [f"o{b}"], name=f"mm{b}o"),
            helper.make_node("Add", [f"h{b}", f"o{b}"], [f"h{b + 1}"]),
        ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                  [helper.make_tensor_value_info(f"h{blocks}", TensorProto.FLOAT, ["b", width])], inits)


def tied_lm_model(vocab: int = 64, hidden: int = 96, seed: int = 0, style: str = "genai", dtype=np.float32):
    """A tiny language model: ``input_ids`` → Gather of the embedding table → a MatMul layer (+ residual) → lm_head
    MatMul reading the same table (tied) → ``logits``; the lookup is also the output ``embeds``.  ``style``:
    ``"genai"`` (one initializer ``[H, V]``, the Gather reads its Transpose, as onnxruntime-genai exports),
    ``"optimum"`` (table ``[V, H]``, the lm_head reads its Transpose) or ``"untied"`` (lm_head has its own weight)."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    table = rng.standard_normal((vocab, hidden)).astype(dtype)
    layer = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(dtype)
    inits = [numpy_helper.from_array(layer, "layer.weight")]
    nodes = []
    if style == "genai":
        inits.append(numpy_helper.from_array(table.T.copy(), "lm_head.weight"))
        nodes.append(helper.make_node("Transpose", ["lm_head.weight"], ["table"], perm=[1, 0], name="embed_transpose"))
        nodes.append(helper.make_node("Gather", ["table", "input_ids"], ["embeds"], name="embed_tokens"))
        head = "lm_head.weight"
    else:
        inits.append(numpy_helper.from_array(table, "embed.weight"))
        nodes.append(helper.make_node("Gather", ["embed.weight", "input_ids"], ["embeds"], name="embed_tokens"))
        if style == "optimum":
            nodes.append(helper.make_node("Transpose", ["embed.weight"], ["head_t"], perm=[1, 0],
                                          name="head_transpose"))
            head = "head_t"
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(dtype), "lm_head.weight"))
            head = "lm_head.weight"
    nodes += [helper.make_node("MatMul", ["embeds", "layer.weight"], ["mixed"], name="layer"),
              helper.make_node("Add", ["embeds", "mixed"], ["hidden"], name="residual"),
              helper.make_node("MatMul", ["hidden", head], ["logits"], name="lm_head")]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    outputs = [helper.make_tensor_value_info("logits", elem, ["B", "S", vocab]),
               helper.make_tensor_value_info("embeds", elem, ["B", "S", hidden])]
    return _model(nodes, [ids], outputs, inits)

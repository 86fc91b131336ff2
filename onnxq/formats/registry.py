"""The emitters by format name: ``emit(target, qw, ctx) -> Rewrite`` (see :mod:`onnxq.formats.common`), and what
each needs of the model before it runs (:func:`required_opset_for`)."""

from __future__ import annotations

from collections.abc import Callable

from onnxq.formats import gather, lowbit, matmulnbits
from onnxq.formats.common import EmitContext, Rewrite
from onnxq.formats.fake import emit_fake
from onnxq.formats.lowbit import emit_onnxq
from onnxq.formats.matmulnbits import emit_matmulnbits
from onnxq.formats.qdq import emit_qdq, required_opset
from onnxq.ir.targets import Target
from onnxq.quantized_weight import QuantizedWeight

Emitter = Callable[[Target, QuantizedWeight, EmitContext], Rewrite]
EMITTERS: dict[str, Emitter] = {
    "matmulnbits": emit_matmulnbits,
    "qdq": emit_qdq,
    "fake": emit_fake,
    "onnxq": emit_onnxq,
}
FALLBACKS = {"matmulnbits": matmulnbits.fallback_reason, "onnxq": lowbit.fallback_reason}


def uses_dequantize_linear(format_name: str, target: Target, group_size: int, ctx: EmitContext) -> bool:
    """Whether ``target`` will be emitted with DequantizeLinear (``qdq``, or a fused format's fallback to it)."""
    if format_name == "qdq":
        return True
    if target.is_lookup:
        return format_name in gather.FUSED_FORMATS and gather.fallback_reason(target, group_size, ctx) is not None
    fallback = FALLBACKS.get(format_name)
    return fallback is not None and fallback(target, group_size, ctx) is not None


def required_opset_for(format_name: str, targets: list[Target], group_sizes: list[int], bits: int,
                       ctx: EmitContext) -> int | None:
    """The default-domain opset the emitted model needs (None: whatever it has): DequantizeLinear of ``bits``-bit
    codes needs :func:`~onnxq.formats.qdq.required_opset`."""
    if any(uses_dequantize_linear(format_name, t, g, ctx) for t, g in zip(targets, group_sizes, strict=True)):
        return required_opset(bits)
    return None

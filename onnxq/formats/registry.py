"""The emitters by format name: ``emit(target, qw, ctx) -> Rewrite`` (see :mod:`onnxq.formats.common`)."""

from __future__ import annotations

from collections.abc import Callable

from onnxq.formats.common import EmitContext, Rewrite
from onnxq.formats.fake import emit_fake
from onnxq.formats.lowbit import emit_onnxq
from onnxq.formats.matmulnbits import emit_matmulnbits
from onnxq.formats.qdq import emit_qdq
from onnxq.ir.targets import Target
from onnxq.quantized_weight import QuantizedWeight

Emitter = Callable[[Target, QuantizedWeight, EmitContext], Rewrite]
EMITTERS: dict[str, Emitter] = {
    "matmulnbits": emit_matmulnbits,
    "qdq": emit_qdq,
    "fake": emit_fake,
    "onnxq": emit_onnxq,
}

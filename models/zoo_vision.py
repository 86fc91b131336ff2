"""CNNs exported by others, as shipped inside PyPI wheels, and the zoo's derived variants of them.

* ``rapidocr-onnxruntime==1.4.4``: PP-OCRv4 text detector (DB, 320×320 pages), PP-OCRv4 recogniser (SVTR-LCNet,
  48×320 lines, 6625-way CTC softmax) and the PP-OCR mobile v2.0 direction classifier (48×192 lines, 0°/180°),
  converted from PaddlePaddle by paddle2onnx: every weight is a ``Constant`` node, opset 11-12, IR 7-8;
* ``nudenet==3.4.2``: a YOLOv8n detector exported by PyTorch at 320×320 (``320n.onnx``; 22 = 4 box + 18 class rows).

The wheels are fetched with ``pip download --no-deps`` and only the ``.onnx`` members are extracted: the packages
are never installed (rapidocr-onnxruntime depends on ``onnxruntime``, which would replace ``onnxruntime-gpu``).

Derived variants: :func:`constants_to_initializers` (the same network with its ``Constant`` weights stored as
initializers, as other exporters write them) and :func:`to_float16` (float16 weights and activations, float32
inputs and outputs, by onnxconverter-common).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from models.cache import atomic_output
from models.zoo_fetch import wheel_member

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
NUDENET = "nudenet==3.4.2"
WHEEL_MODELS = {  # zoo name -> (requirement, member of the wheel)
    "ppocr-det": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr-rec": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr-cls": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "yolov8n-nudenet": (NUDENET, "nudenet/320n.onnx"),
}
OCR_MEAN, OCR_STD = 0.5, 0.5  # rapidocr's config.yaml: (x/255 − 0.5)/0.5 for det, rec and cls
# Logits are recovered from the probabilities these models output, clipped to [2^-14, 1 - 2^-14]: float16's smallest
# normal number, below which a float16 model's probabilities carry no information (ORT computes the fp16 classifier's
# final Softmax in float16 or float32 depending on which graph optimizations apply, see docs/zoo.md).
PROBABILITY_FLOOR = 2.0**-14


def extract_wheel_model(name: str, target: Path) -> Path:
    """Extract the zoo model ``name`` (a key of :data:`WHEEL_MODELS`) from its pinned wheel to ``target``."""
    requirement, member = WHEEL_MODELS[name]
    return wheel_member(requirement, member, target)


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose main-graph ``Constant`` nodes holding a float tensor of ≥ 2 dims become initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = []
    for node in out.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.data_type == onnx.TensorProto.FLOAT and len(value.dims) >= 2:
            out.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        else:
            kept.append(node)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and activations with float32 graph inputs and outputs (onnxconverter-common; the ops ORT
    has no float16 CPU kernel for stay float32 behind Casts)."""
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(model, keep_io_types=True)


def save(model: onnx.ModelProto, target: Path) -> Path:
    """Check and write ``model`` to ``target`` atomically."""
    onnx.checker.check_model(model)
    with atomic_output(target) as temp:
        onnx.save(model, str(temp))
    return target


def ocr_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """PP-OCR's input ``x``: float32 NCHW, ``(x/255 − 0.5)/0.5``."""
    from models.zoo_inputs import to_nchw

    return {"x": to_nchw(images, OCR_MEAN, OCR_STD)}


def yolo_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """YOLOv8's input ``images``: float32 NCHW RGB in [0, 1]."""
    from models.zoo_inputs import to_nchw

    return {"images": to_nchw(images)}


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p.astype(np.float64), PROBABILITY_FLOOR, None))


def sigmoid_logits(p: np.ndarray) -> np.ndarray:
    """The logits behind sigmoid probabilities, ``log p − log(1 − p)`` (probabilities clipped, see above)."""
    p = np.clip(p.astype(np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    return np.log(p) - np.log1p(-p)


def softmax_logits(p: np.ndarray) -> np.ndarray:
    """The logits behind softmax probabilities along the last axis, centred (softmax forgets the mean)."""
    logp = _log(p)
    return logp - logp.mean(axis=-1, keepdims=True)


def yolo_parts(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """YOLOv8's ``output0 [n, 22, anchors]`` per image: box coordinates, and the class-score logits."""
    out = outputs["output0"]
    return {"boxes": out[:, :4].reshape(len(out), -1), "score_logits": sigmoid_logits(out[:, 4:]).reshape(len(out), -1)}


def det_parts(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """PP-OCR det's text-probability map per image, as logits."""
    (out,) = outputs.values()
    return {"map_logits": sigmoid_logits(out).reshape(len(out), -1)}


def rec_parts(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """PP-OCR rec's per-time-step character distribution, as centred logits (one row per time step)."""
    (out,) = outputs.values()
    return {"step_logits": softmax_logits(out).reshape(-1, out.shape[-1])}


def cls_parts(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """PP-OCR cls's log-odds of 180° over the batch, as one row (a 2-class row's centred logits are ±a)."""
    (out,) = outputs.values()
    logp = _log(out)
    return {"log_odds": (logp[:, 1] - logp[:, 0]).reshape(1, -1)}

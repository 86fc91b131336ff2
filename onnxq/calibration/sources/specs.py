"""Model inputs filled from their declared specs (name, dtype, dims): what kind each input is, the shape it gets and
the values that need no data (masks, positions, token types, an empty key/value cache, random values).

Kinds, by the input's lower-cased name and dtype (first rule that matches):

* ``cache``: a float input whose name holds a word of :data:`CACHE_WORDS` ("past", "cache"): a key/value cache;
* ``mask``: the name holds "mask", or the dtype is bool;
* ``position``: an integer input whose name holds "position";
* ``token_type``: an integer input whose name holds "type" or "segment";
* ``ids``: an integer input whose name holds "ids" or "token" (the text source fills it);
* ``image``: a float input of rank 4 whose axis 1 (NCHW) or axis 3 (NHWC) is fixed at 1 or 3 channels;
* ``other``: anything else (only ``--random`` or ``--set`` fill it).

Values without data (:func:`generated_values`): mask 1, positions 0, 1, … along the last axis, token types 0,
floats N(0, 1) (an empty cache holds no value), other integer ids uniform in [0, :data:`ID_RANGE`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnxq.calibration.data import InputSpec
from onnxq.calibration.sources.configs import CacheSizes
from onnxq.errors import OnnxqError

SEQUENCE_LENGTH = 8  # verify: a generated symbolic dimension that is neither the batch nor a cache length
ID_RANGE = 100  # generated integer ids are uniform in [0, ID_RANGE)
CACHE_WORDS = ("past", "cache")  # an input named with one of these is a key/value cache: its lengths are 0
VERIFY_REMEDY = "pass --calib data.npz"
CHANNELS = (1, 3)  # an image input's fixed channel count


def input_kind(spec: InputSpec) -> str:
    """The kind of one model input (rules in the module docstring)."""
    name, dtype = spec.name.lower(), spec.dtype
    if dtype.kind == "f" and any(word in name for word in CACHE_WORDS):
        return "cache"
    if "mask" in name or dtype.kind == "b":
        return "mask"
    if dtype.kind in "iu":
        if "position" in name:
            return "position"
        if "type" in name or "segment" in name:
            return "token_type"
        if "ids" in name or "token" in name:
            return "ids"
    if dtype.kind == "f" and image_layout(spec) is not None:
        return "image"
    return "other"


def image_layout(spec: InputSpec, layout: str | None = None) -> str | None:
    """``"NCHW"`` when axis 1 is fixed at 1 or 3 channels, else ``"NHWC"`` when axis 3 is, else None (not an image);
    ``layout`` (``--layout``) overrides for a rank-4 input."""
    dims = spec.dims
    if dims is None or len(dims) != 4:
        return None
    if layout is not None:
        return layout
    if dims[1] in CHANNELS:
        return "NCHW"
    if dims[3] in CHANNELS:
        return "NHWC"
    return None


def set_remedy(name: str) -> str:
    """How to supply an input by hand."""
    return f"pass --set {name}=file.npy (an array with samples along axis 0)"


def calibration_shape(
    spec: InputSpec,
    samples: int,
    seq_len: int,
    cache: CacheSizes,
    size: tuple[int, int] | None = None,
    layout: str | None = None,
) -> tuple[int, ...]:
    """The shape of ``samples`` calibration samples of one input.

    Axis 0 holds the samples.  A fixed dimension (> 0) stays as declared; a symbolic, unnamed or non-positive one is:

    * in a ``cache`` input of rank 4 ``[batch, kv_heads, past_length, head_size]``: 0 on axis 2 (an empty past),
      ``cache.kv_heads`` on axis 1, ``cache.head_size`` on axis 3 (from ``genai_config.json`` or ``config.json``;
      genai declares the head size as the symbol ``kv_cache_dim``); in a cache input of another rank: 0;
    * in an ``image`` input: ``size`` = (H, W) on the height and width axes of its layout;
    * else ``seq_len`` (sequence axes; a mask's total length ``past + sequence`` is ``seq_len`` as the past is 0).
    """
    if spec.dims is None:
        raise OnnxqError(f"input '{spec.name}' declares no shape, so onnxq cannot fill it; {set_remedy(spec.name)}")
    kind = input_kind(spec)
    rank = len(spec.dims)
    shape = [samples]
    for axis, dim in enumerate(spec.dims[1:], start=1):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif kind == "cache":
            shape.append(_cache_dim(spec, axis, cache) if rank == 4 else 0)
        elif kind == "image":
            shape.append(_image_dim(spec, axis, size, image_layout(spec, layout)))
        else:
            shape.append(seq_len)
    return tuple(shape)


def _cache_dim(spec: InputSpec, axis: int, cache: CacheSizes) -> int:
    if axis == 2:
        return 0
    what, value = ("key/value heads", cache.kv_heads) if axis == 1 else ("head size", cache.head_size)
    if value is None:
        raise OnnxqError(f"input '{spec.name}' declares its {what} as '{spec.dims[axis]}' and no genai_config.json or "
                         f"config.json beside the model gives it; {set_remedy(spec.name)}")
    return value


def _image_dim(spec: InputSpec, axis: int, size: tuple[int, int] | None, layout: str | None) -> int:
    if size is None:
        raise OnnxqError(f"input '{spec.name}' has a free image size {list(spec.dims)}; pass --size H W")
    spatial = (2, 3) if layout == "NCHW" else (1, 2)
    if axis not in spatial:
        raise OnnxqError(f"input '{spec.name}' has a free channel axis {list(spec.dims)} in layout {layout}; "
                         f"{set_remedy(spec.name)}")
    return size[spatial.index(axis)]


# ----------------------------------------------------------------------------- generated inputs (verify)


def generated_inputs(specs: Mapping[str, InputSpec], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of the required inputs, shapes by :func:`generated_shape`, values by
    :func:`generated_values`, drawn from one generator seeded with ``seed`` (same seed, same feeds)."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    shapes = {name: generated_shape(spec, sizes) for name, spec in specs.items() if spec.required}
    return [{name: generated_values(specs[name], shape, rng) for name, shape in shapes.items()} for _ in range(count)]


def generated_shape(spec: InputSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """Fixed dimensions as declared; a symbolic or unnamed one is 1 on axis 0 (batch), 0 in a key/value cache input
    (name holds "past" or "cache": an empty cache), else :data:`SEQUENCE_LENGTH`.  A symbolic name keeps the size it
    got first (``sizes``), so inputs that share a dimension agree."""
    if spec.dims is None:
        raise OnnxqError(f"input '{spec.name}' declares no shape, so no value can be generated for it; "
                         f"{VERIFY_REMEDY}")
    cache = any(word in spec.name.lower() for word in CACHE_WORDS)
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        size = 1 if axis == 0 else 0 if cache else SEQUENCE_LENGTH
        shape.append(sizes.setdefault(dim, size) if dim else size)
    return tuple(shape)


def generated_values(
    spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator, remedy: str = VERIFY_REMEDY
) -> np.ndarray:
    """A mask (name holds "mask"): ones; floats: N(0, 1); bools: True; integers: positions (name holds "position")
    0, 1, … along the last axis, token types / segments 0, other ids uniform in [0, :data:`ID_RANGE`)."""
    name, dtype = spec.name.lower(), spec.dtype
    if "mask" in name or dtype.kind == "b":
        return np.ones(shape, dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind not in "iu":
        raise OnnxqError(f"input '{spec.name}' has dtype {dtype}, for which no value can be generated; {remedy}")
    if "position" in name and shape:
        return np.ascontiguousarray(np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape))
    if "type" in name or "segment" in name:
        return np.zeros(shape, dtype)
    return rng.integers(0, ID_RANGE, shape).astype(dtype)

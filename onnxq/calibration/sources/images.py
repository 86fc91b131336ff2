"""Photos from a folder as a vision model's input.

Files: ``*.jpg``, ``*.jpeg`` and ``*.png`` (any case) directly in the folder, sorted by name; when there are more
than ``samples``, ``samples`` of them are picked without replacement by ``numpy.random.default_rng(seed)`` and kept
in name order.

Each photo is converted to RGB (grayscale ``L`` for a 1-channel input), scaled by ``s = max(H/h, W/w)`` with
bilinear resampling to ``round(w·s) × round(h·s)`` (so it covers H×W, aspect ratio kept) and center-cropped to
H×W (offsets ``(new − target) // 2``).  Values: ``x = (pixel / 255 − mean[c]) / std[c]`` per channel (default mean
0, std 1: values in [0, 1]), computed in float32, transposed to the layout (NCHW or NHWC) and cast to the model's
float dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: str | os.PathLike, samples: int, seed: int) -> list[Path]:
    """The photos to use (rule in the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OnnxqError(f"{folder}: not a folder; pass --images a folder of .jpg/.png photos")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise OnnxqError(f"{folder}: holds no .jpg/.jpeg/.png file; pass --images a folder of photos")
    if samples < 1:
        raise OnnxqError(f"--samples {samples} is out of range; use 1 or more")
    if len(files) > samples:
        picks = np.sort(np.random.default_rng(seed).choice(len(files), size=samples, replace=False))
        files = [files[i] for i in picks]
    return files


def load_photo(path: Path, height: int, width: int, channels: int = 3) -> np.ndarray:
    """``uint8 [height, width, channels]``: the photo resized to cover and center-cropped (optional Pillow)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise OnnxqError("--images needs the Pillow package; pip install 'onnxq[images]'") from None
    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise OnnxqError(f"{path}: not a readable image ({type(exc).__name__}); remove it from the folder") from None
    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)
    return pixels.reshape(height, width, channels)


def normalize(
    pixels: np.ndarray,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    layout: str,
    dtype: np.dtype,
) -> np.ndarray:
    """``(pixels / 255 − mean) / std`` per channel (last axis of ``uint8 [n, H, W, C]``), in ``layout``, as
    ``dtype``."""
    channels = pixels.shape[-1]
    mean_v = _per_channel(mean, 0.0, channels, "--mean")
    std_v = _per_channel(std, 1.0, channels, "--std")
    if np.any(std_v == 0):
        raise OnnxqError(f"--std {' '.join(map(str, std))}: a standard deviation is 0; use positive values")
    values = (pixels.astype(np.float32) / np.float32(255) - mean_v) / std_v
    if layout == "NCHW":
        values = values.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(values.astype(dtype))


def _per_channel(values: Sequence[float] | None, default: float, channels: int, option: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, np.float32)
    if len(values) != channels:
        raise OnnxqError(f"{option} has {len(values)} values, the model's input has {channels} channels; give "
                         f"{channels}")
    return np.asarray(values, np.float32)


def image_batch(
    folder: str | os.PathLike,
    size: tuple[int, int],
    channels: int,
    layout: str,
    dtype: np.dtype,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    samples: int = 128,
    seed: int = 0,
) -> np.ndarray:
    """The folder's photos as one normalised batch ``[n, C, H, W]`` (NCHW) or ``[n, H, W, C]`` (NHWC)."""
    height, width = size
    if height < 1 or width < 1:
        raise OnnxqError(f"--size {height} {width}: both must be 1 or more pixels")
    files = image_files(folder, samples, seed)
    pixels = np.stack([load_photo(path, height, width, channels) for path in files])
    return normalize(pixels, mean, std, layout, dtype)

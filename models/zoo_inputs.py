"""Real inputs for the zoo's vision models: scikit-learn's sample photos and text rendered from Jane Austen.

* :func:`photo_crops`: square crops (random position and scale, seeded) of the two photos that scikit-learn ships
  (``load_sample_images``: a Chinese temple and a flower, 427×640 RGB), resized with PIL;
* :func:`text_lines`: single lines of Emma rendered with PIL's built-in FreeType font (dark text on a light
  background, as an OCR recogniser sees a detected line);
* :func:`text_pages`: photo crops with a block of rendered text pasted in (what an OCR detector looks for).

Each returns ``uint8 [n, height, width, 3]`` RGB; :func:`to_nchw` turns that into a normalised float32 NCHW batch.
Nothing is downloaded: the photos are inside scikit-learn, the text comes from :mod:`models.austen`.
"""

from __future__ import annotations

import functools

import numpy as np

FONT_SIZE_RANGE = (22, 34)  # pixels; lines are 48 px high in PP-OCR's recogniser
TEXT_NOVEL = "emma"


@functools.cache
def sample_photos() -> tuple[np.ndarray, ...]:
    """The two photos bundled with scikit-learn, ``uint8 [427, 640, 3]`` RGB each."""
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(image, dtype=np.uint8) for image in load_sample_images().images)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def photo_crops(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` crops of the sample photos (alternating photos; side 40-100% of the photo's height), resized."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        rows, cols = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * rows)
        crop_w = min(cols, int(side * width / height))
        top, left = int(rng.integers(0, rows - side + 1)), int(rng.integers(0, cols - crop_w + 1))
        crops.append(_resize(photo[top : top + side, left : left + crop_w], height, width))
    return np.stack(crops)


@functools.cache
def _sentences() -> tuple[str, ...]:
    from models.text import novel_sentences

    return tuple(s for s in novel_sentences(TEXT_NOVEL) if 20 <= len(s) <= 200)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def text_lines(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` lines of Emma rendered in ``height × width`` images (text starts at the left, clipped right)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    sentences = _sentences()
    lines = []
    for _ in range(count):
        text = sentences[int(rng.integers(len(sentences)))]
        size = int(rng.integers(*FONT_SIZE_RANGE))
        background = tuple(int(v) for v in rng.integers(200, 256, size=3))
        ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
        image = Image.new("RGB", (width, height), background)
        ImageDraw.Draw(image).text((4, (height - size) // 2 - 2), text, fill=ink, font=_font(size))
        lines.append(np.asarray(image))
    return np.stack(lines)


def text_pages(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo crops with a light box of 3-5 rendered lines of Emma pasted at a random place."""
    rng = np.random.default_rng(seed)
    pages = photo_crops(count, height, width, seed)
    for page in pages:
        n_lines = int(rng.integers(3, 6))
        box_h, box_w = n_lines * 28, int(width * rng.uniform(0.5, 0.9))
        lines = text_lines(n_lines, 28, box_w, seed=int(rng.integers(1 << 30)))
        top, left = int(rng.integers(0, height - box_h)), int(rng.integers(0, width - box_w))
        page[top : top + box_h, left : left + box_w] = lines.reshape(box_h, box_w, 3)
    return pages


def to_nchw(images: np.ndarray, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """``uint8 [n, h, w, 3]`` → float32 ``[n, 3, h, w]`` with ``(x/255 − mean)/std``."""
    scaled = images.astype(np.float32) / 255.0
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)

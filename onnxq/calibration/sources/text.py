"""Token windows of a text file for a language model's ``input_ids``.

The file (UTF-8) is encoded whole with a Hugging Face ``tokenizers`` tokenizer, without special tokens (no BOS or
EOS, no [CLS]/[SEP]: a window is cut from the running text) and without the tokenizer's truncation, and the token
stream is cut into ``len // seq_len`` non-overlapping windows of ``seq_len`` tokens.  ``samples`` of them are
picked without replacement by ``numpy.random.default_rng(seed)`` and kept in text order: every row is ``seq_len``
real consecutive tokens; the same file, tokenizer and seed give the same rows.

The tokenizer is ``--tokenizer`` (a ``tokenizer.json`` file or a folder holding one), else the ``tokenizer.json``
beside the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import OnnxqError

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_file(tokenizer: str | os.PathLike | None, model_path: str | os.PathLike | None) -> Path:
    """The ``tokenizer.json`` to use: ``tokenizer`` (file, or folder holding it), else the one beside the model."""
    if tokenizer is None:
        if model_path is None:
            raise OnnxqError("no tokenizer: pass --tokenizer PATH (a tokenizer.json file or a folder holding it)")
        path = Path(model_path).parent / TOKENIZER_FILE
        if not path.is_file():
            raise OnnxqError(f"{path.parent}: no {TOKENIZER_FILE} beside the model; pass --tokenizer PATH "
                             "(a tokenizer.json file or a folder holding it)")
        return path
    path = Path(tokenizer)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise OnnxqError(f"{path}: tokenizer not found; pass --tokenizer a tokenizer.json file or a folder holding it")
    return path


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` read from ``path`` (the optional ``tokenizers`` package is imported here)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OnnxqError("--text needs the tokenizers package; pip install 'onnxq[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxqError(f"{path}: not a readable tokenizer.json ({reason}); pass another --tokenizer") from None


def read_text(path: str | os.PathLike) -> str:
    """The text file's content (UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OnnxqError(f"{path}: text file not found; pass --text a UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxqError(f"{path}: cannot read the text ({type(exc).__name__}); pass --text a UTF-8 text "
                         "file") from None


def token_ids(text: str, tokenizer: Any) -> np.ndarray:
    """The text's token ids (int64): no special tokens added, the tokenizer's own truncation and padding (e.g.
    BERT's 128 tokens in ``tokenizer.json``) switched off so the whole text is kept."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def token_windows(ids: np.ndarray, samples: int, seq_len: int, seed: int, origin: str = "the text") -> np.ndarray:
    """``[samples, seq_len]`` int64: ``samples`` of the non-overlapping windows ``ids[i·L : (i+1)·L]``, picked
    without replacement with ``default_rng(seed)``, in text order."""
    if samples < 1 or seq_len < 1:
        raise OnnxqError(f"--samples {samples} --seq-len {seq_len}: both must be 1 or more")
    available = len(ids) // seq_len
    if samples > available:
        raise OnnxqError(f"{origin} has {len(ids)} tokens, {available} windows of {seq_len}; use --samples "
                         f"{max(available, 1)} or less, a shorter --seq-len, or a longer text")
    picks = np.sort(np.random.default_rng(seed).choice(available, size=samples, replace=False))
    return np.stack([ids[i * seq_len:(i + 1) * seq_len] for i in picks]).astype(np.int64)


def text_windows(
    text_path: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    model_path: str | os.PathLike | None,
    samples: int,
    seq_len: int,
    seed: int,
) -> np.ndarray:
    """``[samples, seq_len]`` token ids of ``text_path`` (rules in the module docstring)."""
    loaded = load_tokenizer(tokenizer_file(tokenizer, model_path))
    return token_windows(token_ids(read_text(text_path), loaded), samples, seq_len, seed, str(text_path))

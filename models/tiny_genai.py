"""Recipe ``tiny-llama-genai``: a tiny Llama (2 layers, hidden 128, SmolLM2's tokenizer and vocabulary) trained
for a minute on *Pride and Prejudice*, exported by onnxruntime-genai's model builder (``-p fp32 -e cpu``) into
``<cache>/zoo/tiny-llama-genai``.

It is a genai model folder (``genai_config.json``, ``model.onnx`` + ``model.onnx.data``, ``tokenizer.json``) that
quantizes in seconds, so tests can run ``onnxq quantize FOLDER -o FOLDER`` and then generate with
``onnxruntime_genai``. Training (seed 0, AdamW, :data:`STEPS` steps of 16 windows of 64 tokens, the softmax over
the book's :data:`TOP_TOKENS` most frequent tokens to keep a step cheap) gives next-token logits with clear
margins, where a random model's near-ties flip under any weight perturbation; its text is still poor. The export
is checked against PyTorch (min per-token logit cosine) before it is kept; ``build.json`` records the check and the
training loss.

Needs: torch and transformers (the ``models`` extra), the builder's folder (:func:`models.zoo_fetch.tool_env`) and
SmolLM2's ``tokenizer.json`` (:func:`models.smollm2.load_tokenizer`). ``python -m models.tiny_genai`` builds it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from models.austen import build_austen
from models.cache import cache_dir
from models.smollm2 import TOKENIZER_NAME, VOCAB_SIZE, smollm2_dir
from models.zoo_exports import (
    CHECK_MIN_COSINE,
    add_transformers4_keys,
    check_decoder,
    install_export,
    is_built,
    write_build_record,
    zoo_model_dir,
)
from models.zoo_fetch import TOOL_ENVS, run_tool
from onnxq.errors import OnnxqError

NAME = "tiny-llama-genai"
SEED = 0
LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2, initializer_range=0.1)  # head size 64, as SmolLM2's
STEPS, BATCH, WINDOW, LEARNING_RATE, TOP_TOKENS = 200, 16, 64, 1e-2, 2048
TRAIN_NOVEL = "prideprejudice"
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}


def tiny_genai_dir() -> Path:
    """``<cache>/zoo/tiny-llama-genai`` (the genai folder)."""
    return zoo_model_dir(NAME)


def tokenizer_path() -> Path:
    """SmolLM2's ``tokenizer.json`` in the cache (made by :func:`models.smollm2.load_tokenizer`)."""
    return smollm2_dir() / TOKENIZER_NAME


def _torch_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def _train(model, ids: np.ndarray) -> float:
    """Train ``model`` in place on windows of ``ids`` (see the module docstring); returns the last loss."""
    import torch

    torch.manual_seed(SEED)
    counts = np.bincount(ids, minlength=VOCAB_SIZE)
    top = np.argsort(-counts, kind="stable")[:TOP_TOKENS]
    remap = np.full(VOCAB_SIZE, -100, dtype=np.int64)
    remap[top] = np.arange(TOP_TOKENS)
    rows = torch.from_numpy(top)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    model.train()
    for _ in range(STEPS):
        starts = rng.integers(0, len(ids) - WINDOW - 1, BATCH)
        x = torch.from_numpy(np.stack([ids[s:s + WINDOW] for s in starts]))
        y = torch.from_numpy(np.stack([remap[ids[s + 1:s + WINDOW + 1]] for s in starts]))
        logits = model.model(input_ids=x).last_hidden_state @ model.lm_head.weight[rows].T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, TOP_TOKENS), y.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def build_tiny_genai(force: bool = False, log=print) -> Path:
    """Build (once) and return the genai folder; an error when the tokenizer or the export check fails."""
    if not force and is_built(NAME):
        return tiny_genai_dir()
    if not tokenizer_path().is_file():
        raise OnnxqError(f"{tokenizer_path()} is missing; run python -m models.smollm2 first")
    work = cache_dir("zoo", ".work")
    hf, out = work / f"{NAME}-hf", work / NAME
    for folder in (hf, out):
        shutil.rmtree(folder, ignore_errors=True)
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path()))
    text = build_austen()[TRAIN_NOVEL].read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    start = time.perf_counter()
    model = _torch_model()
    loss = _train(model, ids)
    train_seconds = time.perf_counter() - start
    model.save_pretrained(hf)
    shutil.copyfile(tokenizer_path(), hf / TOKENIZER_NAME)
    (hf / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    add_transformers4_keys(hf)
    arguments = ["-i", str(hf), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")]
    seconds = run_tool("genai", "onnxruntime_genai.models.builder", arguments, work / f"{NAME}.log")
    windows = np.stack([ids[1000:1032], ids[2000:2032]])
    cosine = check_decoder(out / "model.onnx", model, windows)
    if cosine < CHECK_MIN_COSINE["fp32"]:
        raise OnnxqError(f"{NAME}: export logits differ from PyTorch (min token cosine {cosine:.6f})")
    install_export(out, NAME)
    shutil.rmtree(hf, ignore_errors=True)
    write_build_record(NAME, {"export_seconds": round(seconds, 1), "check_min_token_cosine_vs_torch": cosine,
                              "train_seconds": round(train_seconds, 1), "train_loss": round(loss, 3),
                              "train": [TRAIN_NOVEL, STEPS, BATCH, WINDOW, LEARNING_RATE, TOP_TOKENS], "llama": LLAMA,
                              "seed": SEED, "tools": list(TOOL_ENVS["genai"])})
    log(f"{NAME}: built in {time.perf_counter() - start:.0f} s, min token cosine vs PyTorch {cosine:.6f}")
    return tiny_genai_dir()


if __name__ == "__main__":
    build_tiny_genai(force="--force" in sys.argv)

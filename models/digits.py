"""Recipe for onnxq's built-in models: an MLP and a small CNN trained on scikit-learn's ``load_digits``.

``python -m models.digits`` trains both (torch CPU, 2 threads, fixed seeds), exports them with the legacy
TorchScript exporter (opset 17, dynamic batch), checks ORT against torch, and writes into ``onnxq/data/``:

* ``digits_mlp.onnx``  input ``pixels`` float32 [B, 64] → ``logits`` [B, 10];
  Gemm(64→128)+Relu, MatMul(128→64)+Add+Relu, Gemm(64→10) (one layer as MatMul so both op types are exercised);
* ``digits_cnn.onnx``  input ``image`` float32 [B, 1, 8, 8] → ``logits`` [B, 10];
  Conv 3×3 (1→16, pad 1)+Relu, grouped Conv 3×3 (16→32, groups=2, stride 2, pad 1)+Relu, Flatten, Gemm(512→10);
* ``digits_test.npz``  held-out 30% (stratified, seed 0): ``pixels``, ``image`` (same samples) and ``labels``;
* ``digits_calib.npz`` 128 samples of the train split: ``pixels`` and ``image`` (model input name → array).

Pixels are the dataset's 0..16 intensities divided by 16. Outputs are byte-identical across runs on one machine.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.cache import atomic_output, file_sha256, write_npz

DATA_DIR = Path(__file__).resolve().parents[1] / "onnxq" / "data"
SEED = 0
TEST_FRACTION = 0.3
CALIBRATION_SAMPLES = 128
OPSET = 17
TORCH_THREADS = 1  # one thread: reproducible reductions, and fast on a busy 2-core machine
ORT_TOLERANCE = 1e-5  # on max|ort − torch| / max(1, max|torch|)
MLP_INPUT, CNN_INPUT, OUTPUT = "pixels", "image", "logits"


@dataclass(frozen=True)
class DigitsSplit:
    """Train/test/calibration arrays: ``x_*`` float32 [n, 64] in [0, 1], ``y_*`` int64 [n]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray


def load_split(seed: int = SEED) -> DigitsSplit:
    """Stratified 70/30 split of ``load_digits``; the calibration set is a fixed random subset of the train split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    calib_rows = np.sort(np.random.default_rng(seed).choice(len(x_train), CALIBRATION_SAMPLES, replace=False))
    return DigitsSplit(x_train, y_train, x_test, y_test, x_train[calib_rows])


def as_images(pixels: np.ndarray) -> np.ndarray:
    """[n, 64] → [n, 1, 8, 8] (row-major 8×8 images)."""
    return np.ascontiguousarray(pixels.reshape(-1, 1, 8, 8))


def _build_modules():  # torch imported lazily: it is a build-time dependency only
    import torch
    from torch import nn

    class DigitsMLP(nn.Module):
        """logits = W3·relu(relu(W1·x + b1)ᵀ·M2 + b2) + b3; the middle layer is a plain matmul (exports as MatMul)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 128)
            self.weight2 = nn.Parameter(torch.empty(128, 64))
            self.bias2 = nn.Parameter(torch.zeros(64))
            nn.init.kaiming_uniform_(self.weight2.T, a=5**0.5)
            self.fc3 = nn.Linear(64, 10)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(self.fc1(pixels))
            hidden = torch.relu(torch.matmul(hidden, self.weight2) + self.bias2)
            return self.fc3(hidden)

    class DigitsCNN(nn.Module):
        """Conv3×3 → Relu → grouped Conv3×3 (stride 2) → Relu → Flatten → Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1, stride=2, groups=2)
            self.fc = nn.Linear(32 * 4 * 4, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(self.conv1(image))
            hidden = torch.relu(self.conv2(hidden))
            return self.fc(torch.flatten(hidden, 1))

    return DigitsMLP, DigitsCNN


def train(module, inputs: np.ndarray, labels: np.ndarray, epochs: int, seed: int = SEED):
    """Adam (lr 3e-3, weight decay 1e-4) on cross-entropy, minibatches of 64 in a seeded order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(inputs)
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3, weight_decay=1e-4)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            rows = order[start : start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
    module.eval()
    return module


def export_onnx(module, example: np.ndarray, input_name: str, path: Path, metadata: dict[str, str]) -> None:
    """Legacy-exporter ONNX (opset 17, dynamic batch axis ``batch``), with ``metadata`` in metadata_props."""
    import onnx
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.from_numpy(example),),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=[OUTPUT],
        dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
    )
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    with atomic_output(path) as temp_path:
        temp_path.write_bytes(model.SerializeToString())


def ort_logits(path: Path, input_name: str, inputs: np.ndarray) -> np.ndarray:
    """Run an ONNX file on CPU with ORT and return its logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {input_name: inputs})[0]


def build_digits(out_dir: Path = DATA_DIR, epochs: int = 60) -> dict[str, float]:
    """Train, export, verify (ORT vs torch) and write the built-in models and data; return test accuracies."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    split = load_split()
    mlp_class, cnn_class = _build_modules()
    specs = {
        "mlp": (mlp_class, MLP_INPUT, split.x_train, split.x_test),
        "cnn": (cnn_class, CNN_INPUT, as_images(split.x_train), as_images(split.x_test)),
    }
    accuracies: dict[str, float] = {}
    for offset, (name, (module_class, input_name, x_train, x_test)) in enumerate(specs.items()):
        torch.manual_seed(SEED + offset)
        module = train(module_class(), x_train, split.y_train, epochs, seed=SEED + offset)
        with torch.no_grad():
            torch_logits = module(torch.from_numpy(x_test)).numpy()
        accuracy = float(np.mean(torch_logits.argmax(axis=1) == split.y_test))
        path = out_dir / f"digits_{name}.onnx"
        metadata = {
            "onnxq.dataset": "sklearn.datasets.load_digits, pixels/16, stratified 70/30 split (seed 0)",
            "onnxq.test_data": "digits_test.npz",
            "onnxq.fp32_test_accuracy": f"{accuracy:.4f}",
        }
        export_onnx(module, x_test[:2], input_name, path, metadata)
        max_diff = float(np.max(np.abs(ort_logits(path, input_name, x_test) - torch_logits)))
        relative_diff = max_diff / max(1.0, float(np.max(np.abs(torch_logits))))
        print(f"digits_{name}: ORT vs torch max abs diff {max_diff:.2e}, relative to max |logit| {relative_diff:.2e}")
        if relative_diff > ORT_TOLERANCE:
            raise RuntimeError(f"digits_{name}: ORT differs from torch by {relative_diff:.2e} > {ORT_TOLERANCE:.0e}")
        accuracies[name] = accuracy
    write_npz(
        out_dir / "digits_test.npz",
        {MLP_INPUT: split.x_test, CNN_INPUT: as_images(split.x_test), "labels": split.y_test},
    )
    write_npz(out_dir / "digits_calib.npz", {MLP_INPUT: split.x_calib, CNN_INPUT: as_images(split.x_calib)})
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.digits",
        description="Train and export onnxq's built-in digits MLP and CNN into onnxq/data/.",
        epilog="Example: python -m models.digits && sha256sum onnxq/data/digits_*",
    )
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="output directory (default: onnxq/data)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs per model (default: 60)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    accuracies = build_digits(args.out_dir, args.epochs)
    for name, accuracy in accuracies.items():
        print(f"digits_{name}: fp32 test accuracy {accuracy:.4f}")
    for path in sorted(args.out_dir.glob("digits_*")):
        print(f"{path.name:<20} {path.stat().st_size:>8} bytes  sha256 {file_sha256(path)[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

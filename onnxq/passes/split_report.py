"""What a SplitQuant run did: per layer and activation, the thresholds, and the quantization error each would have
at common settings with and without the split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from onnxq.ir.targets import Skipped

BRANCH_NAMES = ("lower", "middle", "upper")


REPORT_BITS = (2, 3, 4, 8)


REPORT_GROUP_SIZE = 64


@dataclass
class SplitLayer:
    """One original layer that became three branches."""

    name: str
    op_type: str
    weight: str
    shape: tuple[int, int]  # (N, K) of the solver matrix
    itemsize: int  # bytes per float weight value
    thresholds: tuple[float, float] | None  # None for Conv (one pair per output kernel)
    counts: tuple[int, int, int]  # weight values per branch
    bias: str  # "split", "kept on the lower branch (…)", or "none"
    branches: list[str]
    shares_weight: bool = False  # the weight was already split for an earlier node (stored once)


@dataclass
class SplitActivation:
    name: str
    op_type: str
    output: str
    thresholds: tuple[float, float]
    fractions: tuple[float, float, float]  # share of calibration values per branch


@dataclass
class SplitReport:
    """What ``onnxq split`` did and what it costs; :meth:`lines` is what the CLI prints."""

    method: str = "exact"
    seed: int = 0
    layers: list[SplitLayer] = field(default_factory=list)
    activations: list[SplitActivation] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    skipped_activations: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def extra_nodes(self) -> int:
        return self.nodes_after - self.nodes_before

    def weight_bytes(self, bits: int | None = None, group_size: int = -1, split: bool = True) -> int:
        """Bytes of the split layers' weights (each distinct weight once): float, or ``bits``-bit codes
        plus an fp32 scale and a ``bits``-bit zero point per group of ``group_size`` (-1: per channel)."""
        total = 0
        for layer in self.layers:
            if layer.shares_weight:
                continue
            n, k = layer.shape
            if bits is None:
                one = n * k * layer.itemsize
            else:
                groups = 1 if group_size == -1 else math.ceil(k / group_size)
                one = math.ceil(n * k * bits / 8) + n * groups * 4 + math.ceil(n * groups * bits / 8)
            total += one * (3 if split else 1)
        return total

    def flops_per_position(self, split: bool = True) -> int:
        """Multiply-adds ×2 of the split layers per output position (token / pixel), plus the two Adds."""
        total = 0
        for layer in self.layers:
            n, k = layer.shape
            total += 3 * 2 * n * k + 2 * n if split else 2 * n * k
        return total

    def lines(self) -> list[str]:
        out = [f"SplitQuant: split {len(self.layers)} layers into 3 branches (k-means {self.method}, seed {self.seed})"
               + (f", {len(self.activations)} activations" if self.activations else "")
               + f" in {self.seconds:.1f}s"]
        for layer in self.layers:
            n, k = layer.shape
            where = ("per-kernel thresholds" if layer.thresholds is None
                     else f"thresholds {layer.thresholds[0]:.4g} / {layer.thresholds[1]:.4g}")
            shares = "/".join(f"{100 * c / max(sum(layer.counts), 1):.1f}%" for c in layer.counts)
            out.append(f"  {layer.op_type} '{layer.name}' [{n}x{k}]: {where}, values {shares}, bias {layer.bias}")
        for act in self.activations:
            shares = "/".join(f"{100 * f:.1f}%" for f in act.fractions)
            out.append(f"  {act.op_type} '{act.name}' -> '{act.output}': thresholds {act.thresholds[0]:.4g} / "
                       f"{act.thresholds[1]:.4g}, calibration values {shares}")
        for s in self.skipped + self.skipped_activations:
            out.append(f"left alone: {s.op_type} '{s.name}': {s.reason}")
        out.append(f"extra nodes: {self.extra_nodes} ({self.nodes_before} -> {self.nodes_after})")
        out.extend(f"note: {note}" for note in self.notes)
        if not self.layers:
            return out
        mb = 1e6
        out.append(f"weights, float: split layers {self.weight_bytes(split=False) / mb:.3f} MB -> "
                   f"{self.weight_bytes() / mb:.3f} MB; model {self.bytes_before / mb:.3f} MB -> "
                   f"{self.bytes_after / mb:.3f} MB ({self.bytes_after / max(self.bytes_before, 1):.2f}x)")
        before, after = self.flops_per_position(False), self.flops_per_position()
        out.append(f"FLOPs per output position (token/pixel), split layers: {before / mb:.3f} M -> {after / mb:.3f} M "
                   f"({after / max(before, 1):.2f}x, incl. 2 Adds per layer)")
        out.append("weights of split layers after quantization (b-bit codes, fp32 scale, b-bit zero point per group):")
        for bits in REPORT_BITS:
            cells = []
            for group_size, label in ((-1, "per-channel"), (REPORT_GROUP_SIZE, f"group-{REPORT_GROUP_SIZE}")):
                plain = self.weight_bytes(bits, group_size, split=False)
                cells.append(f"{label} {plain / mb:.3f} MB -> {self.weight_bytes(bits, group_size) / mb:.3f} MB")
            out.append(f"  INT{bits}: " + "; ".join(cells))
        return out

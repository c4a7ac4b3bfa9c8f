"""Rank-0 logging: a console line per log interval, ``metrics.jsonl``, TensorBoard when installed.

Throughput in model FLOPs uses Megatron's count for a BERT training step (forward + backward =
3 × forward, no recompute counted; LM logits over all positions):

    forward FLOPs per sequence = L · (24 s h² + 4 s² h) + 2 s h V

``tflops_per_gpu`` = that × sequences per second / GPUs; ``mfu`` divides by the GPU's dense bf16 peak.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

# dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s
_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12, "V100": 125e12}


def flops_per_sequence(num_layers: int, hidden: int, seq: int, vocab: int) -> float:
    return 3.0 * (num_layers * (24 * seq * hidden * hidden + 4 * seq * seq * hidden) + 2 * seq * hidden * vocab)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAKS.items():
        if key in name:
            return peak
    return None


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """No-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, stream=sys.stdout):
        self.enabled = enabled
        self.stream = stream
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except Exception:
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def train_line(self, r: dict, max_steps: int, eta_s: float) -> None:
        parts = [f"step {r['step']}/{max_steps}", f"loss {r['loss']:.4f}"]
        if r.get("lm_loss") is not None:
            parts.append(f"lm {r['lm_loss']:.4f}")
        if r.get("binary_loss") is not None:
            parts.append(f"binary {r['binary_loss']:.4f}")
        parts += [f"lr {r['lr']:.3g}", f"grad {r['grad_norm']:.3f}"]
        if r.get("loss_scale") is not None:
            parts.append(f"scale {r['loss_scale']:.0f}")
        parts += [f"{r['samples_per_s']:.1f} samples/s", f"{r['tokens_per_s'] / 1e3:.1f}k tok/s"]
        if r.get("tflops_per_gpu") is not None:
            parts.append(f"{r['tflops_per_gpu']:.1f} TFLOP/s/GPU")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("skipped"):
            parts.append(f"skipped {r['skipped']}")
        parts.append(f"ETA {_fmt_time(eta_s)}")
        self.console(" | ".join(parts))

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Interval timer: samples, tokens and model FLOPs per second since the last report."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.samples = 0
        self.data_wait = 0.0

    def add(self, samples: int) -> None:
        self.samples += samples

    def report(self) -> tuple[float, float, float]:
        """(seconds, samples, data-wait seconds) since last report; resets."""
        now = time.perf_counter()
        out = (now - self.t0, self.samples, self.data_wait)
        self.t0, self.samples, self.data_wait = now, 0, 0.0
        return out

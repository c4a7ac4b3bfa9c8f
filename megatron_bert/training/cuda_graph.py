"""Whole-step CUDA graphs (``train.cuda_graph=true``): capture one training step — forward and
backward of every micro-batch, gradient all-reduces, norm, clipping and AdamW — once, then replay it,
each new batch copied into the captured input buffers.

Why: a BERT step launches ~1,700 kernels; at seq 128 on one H200 the GPU waited for Python for a
third of the step (BENCHMARKS.md: 64.9 → 40.2 ms). A replay is one launch. The trainer uses it for
single-GPU pretraining only so far: capturing NCCL collectives (TP/DP > 1) has not been run here.

What keeps a replay the same computation as an eager step:
* static shapes: one graph per input signature (which inputs are present, their shapes and dtypes),
  so padded and unpadded batches each get theirs; the pretraining task pads the MLM target positions
  to a fixed count. A batch of a new signature beyond ``max_graphs`` runs eagerly.
* no host decisions inside the step: the trainer's ``_step_on_device`` keeps the clip coefficient and
  the non-finite skip on the device, and the optimizer reads the LR from a device tensor.
* warm-up: the first ``warmup`` steps run eagerly (torch.compile, lazy optimizer state, cuBLAS and
  cuDNN plans), and only then is anything captured.
* randomness: dropout draws from CUDA generators registered with the graph, so each replay draws
  fresh masks (tests/test_gpu.py checks it).
* memory: the graphs share one private pool; the tensors a replay returns live there and are
  overwritten by the next replay (the trainer reads them right away).
"""
from __future__ import annotations

from typing import Callable

import torch

Inputs = list[dict]  # micro-batches of model inputs: name -> host tensor or None


def signature(micro_batches: Inputs) -> tuple:
    return tuple(tuple((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in sorted(mb.items()))
                 for mb in micro_batches)


class StepGraphs:
    def __init__(self, step_fn: Callable[[Inputs], dict], device: torch.device, warmup: int = 2,
                 max_graphs: int = 4, log=print):
        self.step_fn, self.device, self.log = step_fn, device, log
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Inputs, dict]] = {}
        self.pool = None
        self.eager_steps = 0
        self.replays = 0
        self._said_overflow = False

    def _static_buffers(self, micro_batches: Inputs) -> Inputs:
        return [{k: None if v is None else torch.empty(v.shape, dtype=v.dtype, device=self.device)
                 for k, v in mb.items()} for mb in micro_batches]

    @staticmethod
    def _copy_in(static: Inputs, micro_batches: Inputs) -> None:
        for dst, src in zip(static, micro_batches):
            for k, v in src.items():
                if v is not None:
                    dst[k].copy_(v, non_blocking=True)

    def _capture(self, micro_batches: Inputs):
        static = self._static_buffers(micro_batches)
        self._copy_in(static, micro_batches)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread and the async checkpoint writer keep
        # running beside the capture; only this thread's CUDA calls are being recorded.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.step_fn(static)
        self.pool = graph.pool()
        self.log(f"train.cuda_graph: captured the training step (graph {len(self.graphs) + 1}, "
                 f"inputs {', '.join(k for k, v in micro_batches[0].items() if v is not None)})")
        return graph, static, out

    def __call__(self, micro_batches: Inputs) -> dict:
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self.step_fn(micro_batches)
        key = signature(micro_batches)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._said_overflow:
                    self.log(f"train.cuda_graph: more than {self.max_graphs} input shapes; new shapes run eagerly")
                    self._said_overflow = True
                return self.step_fn(micro_batches)
            # The capture records without running: replay below runs this batch.
            entry = self.graphs[key] = self._capture(micro_batches)
        else:
            self._copy_in(entry[1], micro_batches)
        graph, _, out = entry
        graph.replay()
        self.replays += 1
        return out

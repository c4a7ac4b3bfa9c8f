"""Time our pretraining step on GPU(s) through the real trainer code path.

    python bench/bench_pretrain.py --model 345m --seq 512 --batch 32            # TP=1
    torchrun --nproc_per_node=4 bench/bench_pretrain.py --tp 4 --batch 32 --sp   # TP=4
    python bench/bench_pretrain.py --tp 4 --fake-tp --sp ...   # one rank of TP=4, no communication

The step is ``Trainer.train_step`` (forward/backward over micro-batches, grad sync, clipping, fused
AdamW) on synthetic batches already in pinned host memory: 15% of positions are MLM targets (as in
real BERT data), token types split the sequence, no padding unless ``--pad``. Prints ``RESULT {json}``
with seq/s, TFLOP/s per GPU and MFU (the same FLOPs formula as ../shared/bench/anchors.py: full-
vocabulary logits and the last layer at every position are counted even though we compute them only
at the targets and [CLS]: model FLOPs, not the FLOPs run), and peak memory.

``--fake-tp``: one process runs rank 0 of a TP=``--tp`` job on one GPU, over torch's fake process
group (collectives return at once; ``fake_collectives`` fills the outputs of gathers and
reduce-scatters from this rank's data). Its step time is one rank's compute and memory traffic at that
TP, communication taken out: the most that TP can gain before any link is used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from megatron_bert.training.config import Schema  # noqa: E402
from megatron_bert.training.metrics import flops_per_sequence  # noqa: E402
from megatron_bert.training.pretrain import PretrainTask  # noqa: E402
from megatron_bert.training.trainer import Trainer  # noqa: E402
from parallel import ParallelState  # noqa: E402


def fake_collectives() -> None:
    """Under the fake process group an all-gather or reduce-scatter leaves its output uninitialised
    (NaNs would stop the step): give them this rank's data instead, a copy of the output's size - the
    local write that a real collective also makes. All-reduces keep the input (the fake group's own)."""
    lib = torch.library.Library("_c10d_functional", "IMPL")

    def all_gather(x, group_size, group_name):
        return x.repeat(group_size, *([1] * (x.dim() - 1)))

    def reduce_scatter(x, op, group_size, group_name):
        return x[: x.shape[0] // group_size].clone()

    for dev in ("CUDA", "CPU"):
        lib.impl("all_gather_into_tensor", all_gather, dev)
        lib.impl("reduce_scatter_tensor", reduce_scatter, dev)
    fake_collectives.lib = lib  # the registrations live as long as the library object


SIZES = {"345m": (24, 1024, 16), "1.3b": (24, 2048, 32), "3.9b": (48, 2560, 40), "base": (12, 768, 12)}


class SyntheticPretrainTask(PretrainTask):
    """PretrainTask with random batches instead of a dataset (same loss / step code)."""

    def __init__(self, cfg, ps, log, vocab, pad):
        super().__init__(cfg, ps, log)
        self.vocab, self.pad = vocab, pad
        self.tokenizer_path, self.data_prefix = "synthetic", "synthetic"

    def setup(self):
        return self.vocab

    def _micro_batch(self, g, mb, s, first_id):
        ids = torch.randint(5, self.vocab, (mb, s), generator=g)
        types = torch.zeros(mb, s, dtype=torch.long)
        types[:, s // 2:] = 1
        mask = torch.ones(mb, s, dtype=torch.long)
        if self.pad:
            for i in range(mb):
                mask[i, s - (i * 37) % (s // 4):] = 0
        labels = torch.full((mb, s), -100)
        for i in range(mb):  # the data pipeline's budget: round(15% of the real tokens) targets per sample
            real = int(mask[i].sum())
            pick = 1 + torch.randperm(real - 1, generator=g)[:max(1, round(0.15 * real))]
            labels[i, pick] = ids[i, pick]
        batch = dict(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels,
                     binary_label=torch.randint(0, 2, (mb,), generator=g),
                     sample_id=torch.arange(first_id, first_id + mb))
        if self.ps.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return self.model_inputs(batch)

    def train_batches(self, consumed_samples):
        t = self.cfg.train
        g = torch.Generator().manual_seed(1234 + self.ps.dp_rank)
        n_micro = t.global_batch_size // (t.micro_batch_size * self.ps.dp_size)
        pool = [[self._micro_batch(g, t.micro_batch_size, self.cfg.data.seq_length, k * 1000 + j)
                 for j in range(n_micro)] for k in range(2)]
        k = 0
        while True:
            yield pool[k % 2]
            k += 1


def print_launches(prof, pattern: str, steps: int) -> None:
    """LAUNCH lines: per step, how many kernels matching ``pattern`` each CPU op chain (innermost op
    and three of its parents, with the innermost op's input shapes) launched, most first."""
    import re
    from collections import Counter

    from torch.autograd import DeviceType

    found = Counter()
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        hits = [k.name for k in getattr(e, "kernels", []) if re.search(pattern, k.name)]
        if not hits:
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name)
            parent = parent.cpu_parent
        for name in hits:
            found[(name[:50], " < ".join(chain), str(e.input_shapes)[:120])] += 1
    for (kernel, chain, shapes), n in found.most_common(40):
        print("LAUNCH", f"{n / steps:g}/step", kernel, "|", chain, "|", shapes, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="345m", choices=sorted(SIZES))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--sp", action="store_true")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--dropout-impl", default="native", choices=["native", "keyed"])
    p.add_argument("--compile", action="store_true", help="torch.compile each layer")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--cuda-graph", action="store_true", help="capture the whole step as CUDA graphs")
    p.add_argument("--recompute", default="none")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--pad", action="store_true", help="padded batches (masked attention)")
    p.add_argument("--no-prune", action="store_true",
                   help="train.prune_last_layer=false: the last layer at every position, not just [CLS] + targets")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-ops", type=int, default=0, metavar="N",
                   help="with --profile (and no --cuda-graph): also print the N aten ops with the most GPU time, "
                        "by input shape (which op launched which kernel)")
    p.add_argument("--profile-launches", default="", metavar="REGEX",
                   help="with --profile (and no --cuda-graph): which ops launched the kernels whose names match "
                        "REGEX (e.g. 'Memset|Fill|distribution'), counted per step by op chain and input shapes")
    p.add_argument("--tag", default="")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    p.add_argument("--fake-tp", action="store_true",
                   help="one process as rank 0 of TP=--tp with no-op collectives (module docstring)")
    a = p.parse_args()

    L, h, heads = SIZES[a.model]
    world = a.tp if a.fake_tp else int(os.environ.get("WORLD_SIZE", 1))
    dp = world // a.tp
    mb = a.micro_batch or a.batch // dp
    cfg = OmegaConf.structured(Schema)
    cfg.run_dir = "/tmp/bench_run"
    cfg.model.update(name=a.model, num_layers=L, hidden_size=h, num_attention_heads=heads, vocab_size=a.vocab,
                     max_position_embeddings=max(512, a.seq))
    cfg.parallel.update(tensor=a.tp, sequence_parallel=a.sp, recompute=a.recompute, dropout_impl=a.dropout_impl)
    cfg.data.update(seq_length=a.seq, binary_head="sop")
    cfg.train.update(global_batch_size=a.batch, micro_batch_size=mb, precision=a.precision, device=a.device,
                     compile=a.compile, compile_mode=a.compile_mode, cuda_graph=a.cuda_graph, max_steps=a.warmup + a.iters, lr=1e-4, log_interval=10**9,
                     eval_interval=10**9, prune_last_layer=not a.no_prune)
    cfg.checkpoint.update(dir=None, resume="none")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if a.fake_tp:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        fake_collectives()
        dev = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=a.tp)
        os.environ.setdefault("MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED", "1")  # no NCCL to keep out of a graph
        ps = ParallelState.from_process_group(a.tp, dev, "fake", owns=True)
    else:
        ps = ParallelState.from_env(a.tp, a.device)
    cuda = ps.device.type == "cuda"
    trainer = Trainer(cfg, ps, None)
    trainer.writer.enabled = False
    trainer.task = SyntheticPretrainTask(cfg, ps, trainer.log, a.vocab, a.pad)
    trainer.setup()
    batches = trainer.task.train_batches(0)

    def step():
        trainer.train_step(next(batches))
        trainer.step += 1

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_compile = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t_compile
    # Peak memory over the whole run (warm-up and graph capture included): after a capture the
    # activations live in the graph's private pool, which a peak reset here would stop counting.
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    sync()  # each step already ends in a host sync (grad-norm check), so wall time is device time
    dt = (time.perf_counter() - t0) / a.iters

    if a.profile and ps.is_main and cuda:
        from torch.profiler import ProfilerActivity, profile

        from profile_summary import print_summary, summarize

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     record_shapes=a.profile_ops > 0 or bool(a.profile_launches)) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        print_summary(summarize(prof, 2), a.tag)
        if a.profile_ops:
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_device_time_total", row_limit=a.profile_ops, max_name_column_width=60,
                max_shapes_column_width=90), flush=True)

        if a.profile_launches:
            print_launches(prof, a.profile_launches, 2)

    fl = flops_per_sequence(L, h, a.seq, a.vocab) * a.batch
    if ps.is_main:
        r = dict(which="ours", tag=a.tag, tp=a.tp, fake_tp=a.fake_tp, dp=dp, sp=a.sp, model=a.model, seq=a.seq, batch=a.batch,
                 micro_batch=mb, dropout=a.dropout_impl, compile=a.compile and a.compile_mode, cuda_graph=a.cuda_graph, recompute=a.recompute, pad=a.pad,
                 prune_last_layer=not a.no_prune,
                 step_ms=round(dt * 1e3, 2), seq_per_s=round(a.batch / dt, 1),
                 tflops_per_gpu=round(fl / dt / world / 1e12, 1), mfu_989=round(fl / dt / world / 989e12, 3),
                 mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                 mem_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                 warmup_s=round(warm_s, 1), gpu=torch.cuda.get_device_name() if cuda else "cpu",
                 triton_dropout=any(getattr(m, "bda_kernel", None) is not None for m in trainer.model.modules()),
                 residual_norm=any(getattr(m, "residual_norm", False) for m in trainer.model.modules()),
                 flat_adamw=getattr(trainer.optimizer, "flat", None) is not None,
                 graphs_captured=len(getattr(trainer.step_graphs, "graphs", None) or {}))
        print("RESULT", json.dumps(r), flush=True)
    ps.destroy()


if __name__ == "__main__":
    main()

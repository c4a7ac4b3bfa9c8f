"""Run under torchrun (see test_gpu.py): TP=N vs TP=1 in bf16 through the trainer's step (two
micro-batches a step), eager with keyed dropout, then under train.compile (each layer's halves
compiled with the TP collectives inside, our attention kernels on each rank's heads) with dropout off.

``--tp N`` (default 2): N ranks, one TP group. ``--shared-gpu``: every rank on cuda:0 over gloo (NCCL
refuses two ranks on one device): the GPU code paths at TP=N (kernels on sharded shapes, sequence
parallel, the vocab-parallel loss, compiled halves with collectives) checked on a one-GPU machine;
the NCCL run itself needs N GPUs."""
import argparse
import json
import os

from gpu_steps import run_steps, small_config
from parallel import ParallelState


def losses(tp, ps, compiled=False, steps=5):
    cfg = small_config(steps, global_batch_size=8, micro_batch_size=4, compile=compiled)  # grads accumulate
    cfg.parallel.update(tensor=tp, sequence_parallel=tp > 1, dropout_impl="native" if compiled else "keyed")
    if compiled:  # native masks differ with the layout: compare without dropout
        cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0)
    return run_steps(cfg, ps, steps, pad=True)[0]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--shared-gpu", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.shared_gpu:
        import gloo_cuda_shim

        ps = ParallelState.from_process_group(args.tp, gloo_cuda_shim.init_shared_gpu(), "gloo", owns=True)
    else:
        ps = ParallelState.from_env(args.tp, "cuda")
    single = ParallelState.single(ps.device)
    result = {"tp": losses(args.tp, ps), "tp1": losses(1, single),
              "tp_compiled": losses(args.tp, ps, compiled=True), "tp1_compiled": losses(1, single, compiled=True)}
    if ps.is_main:
        print("RESULT", json.dumps(result), flush=True)
    ps.destroy()

"""``torchrun --nproc_per_node=N tests/shared_gpu_train.py key=value ...``: the training CLI with every
rank on cuda:0 and gloo between them (tests/gloo_cuda_shim.py says why the shim), for TP>1 GPU
runs on a one-GPU machine. The process group is made here; ``ParallelState.from_env`` takes it as
it finds it, and on one GPU every LOCAL_RANK resolves to cuda:0."""
import os
import sys

import torch.distributed as dist

import gloo_cuda_shim

if __name__ == "__main__":
    gloo_cuda_shim.init_shared_gpu()
    from megatron_bert.train import main

    code = main(sys.argv[1:])
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

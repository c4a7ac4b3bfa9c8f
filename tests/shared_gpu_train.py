"""``torchrun --nproc_per_node=N tests/shared_gpu_train.py key=value ...``: the training CLI with every
rank on cuda:0 and gloo between them (tests/gloo_cuda_shim.py says why the shim), for TP>1 GPU
runs on a one-GPU machine. The process group is made here; ``ParallelState.from_env`` takes it as
it finds it, and on one GPU every LOCAL_RANK resolves to cuda:0."""
import os
import sys

# Every rank on one GPU, also on a machine with more (the first visible one); before CUDA starts.
os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gloo_cuda_shim  # noqa: E402

if __name__ == "__main__":
    gloo_cuda_shim.install()
    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    from megatron_bert.train import main

    code = main(sys.argv[1:])
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

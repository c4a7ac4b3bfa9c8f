"""Run a function on N real processes (gloo, CPU) from inside pytest.

The ranks are separate processes forked from a multiprocessing *forkserver* that has imported torch
and the project once (``_PRELOAD``): a fresh interpreter per rank costs ~3 s of imports and ~1 s of
interpreter teardown, which on a 2-core box made start-up, not the checks, the cost of these tests.
The server only imports (no tensor work, no threads), each rank still makes its own gloo process
group, and gets the caller's current environment and working directory. Tests still batch many
checks into one function per world size. The function must be importable (module level); it
receives the rank's ``ParallelState`` plus the given args and returns something picklable.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch.multiprocessing as mp

# imported once by the forkserver, inherited by every rank (a module that fails to import is skipped)
_PRELOAD = ["torch", "torch.distributed", "parallel", "megatron_bert.model", "megatron_bert.checkpoint"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, tensor_parallel, init_file, fn, args, queue, environ, cwd):
    os.environ.clear()  # the caller's environment now, not the forkserver's from when it started
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        from parallel import ParallelState

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        ps = ParallelState.from_process_group(tensor_parallel, torch.device("cpu"), "gloo", owns=True)
        result = fn(ps, *args)
        queue.put((rank, "ok", result))
        ps.destroy()
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(world_size: int, tensor_parallel: int, fn, *args, timeout: float = 180.0) -> list:
    """Run ``fn(ps, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first call)
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        here = (dict(os.environ), os.getcwd())
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, tensor_parallel, init_file, fn, args, queue, *here))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "error":
                    errors.append(f"--- rank {rank} ---\n{payload}")
                    break
                results[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 30)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]

"""``train.profile_steps=[START,END]``: a torch.profiler trace of those steps, on ``train.profile_ranks``.

Each profiled rank writes ``<run_dir>/profile/rank_<R>.json`` (Chrome trace: open it in Perfetto or
chrome://tracing) and ``rank_<R>_ops.txt`` (the operators by total time). Every step inside the window
is one ``train_step_<N>`` range in the trace, so a step's kernels, collectives and host gaps line up
under it. Steps are the run's own numbers (1-based, as in metrics.jsonl), so a resumed run profiles
what is left of the window. The window closes early if the run stops inside it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps, ranks, rank: int, run_dir, device: torch.device, log):
        self.window = tuple(int(s) for s in steps) if steps is not None else None
        self.enabled = self.window is not None and rank in {int(r) for r in ranks}
        self.rank, self.out, self.log = rank, Path(run_dir) / "profile", log
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = None
        self._done = False

    def step(self, n: int):
        """Context for step ``n``: opens the profiler at the window's first step (or the first one this
        run reaches), labels the step, closes and writes the trace after the window's last step."""
        if not self.enabled or self._done or not self.window[0] <= n <= self.window[1]:
            return contextlib.nullcontext()
        if self._prof is None:
            self._prof = torch.profiler.profile(activities=self.activities)
            self._prof.__enter__()
        return self._labelled(n)

    @contextlib.contextmanager
    def _labelled(self, n: int):
        with torch.profiler.record_function(f"train_step_{n}"):
            yield
        if n == self.window[1]:
            self.close()

    def close(self, sync: bool = True):
        """Stop and write what was recorded (also when the run stops inside the window). ``sync=False``
        when the run failed: no waiting on the device, and a failure to write is only reported, so the
        run's own error is the one that surfaces."""
        if self._prof is None:
            return
        prof, self._prof, self._done = self._prof, None, True
        try:
            if sync and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            self.out.mkdir(parents=True, exist_ok=True)
            trace = self.out / f"rank_{self.rank}.json"
            prof.export_chrome_trace(str(trace))
            sort = "cuda_time_total" if len(self.activities) > 1 else "cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
            (self.out / f"rank_{self.rank}_ops.txt").write_text(table)
        except Exception as e:
            if sync:
                raise
            self.log(f"profile of rank {self.rank} not written ({type(e).__name__}: {e})")
            return
        self.log(f"profile of steps {self.window[0]}-{self.window[1]} (rank {self.rank}): {trace}")

"""Helpers for the checkpoint tests: concurrent launches, a `latest` watcher, crafted pickles."""
from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from train_fixtures import REPO, env


def launch(overrides: list[str], nproc: int = 1, env_extra: dict | None = None, module: str = "megatron_bert.train"
           ) -> subprocess.Popen:
    """Start a run without waiting (``train_fixtures.train`` is the blocking version). Output goes to
    temporary files (a pipe nobody drains could block a long run); ``finish`` collects it."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *overrides]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**env(), **(env_extra or {})}, cwd=REPO)
    p.logs = (out, err)
    return p


def output(p: subprocess.Popen) -> tuple[str, str]:
    texts = []
    for f in p.logs:
        f.seek(0)
        texts.append(f.read())
    return texts[0], texts[1]


def finish(procs: dict, timeout: float = 300) -> dict:
    """Wait for every process in ``procs``; → {name: (returncode, stdout, stderr)}."""
    res, deadline = {}, time.monotonic() + timeout
    for name, p in procs.items():
        note = ""
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            p.wait()
            note = "\n[test] killed after timeout"
        so, se = output(p)
        res[name] = (p.returncode, so, se + note)
    return res


class RunQueue:
    """Independent runs started in the given order, at most ``limit`` of them running at a time; runs named
    in ``uncounted`` (ones that mostly sleep) start in their turn without taking a slot. On a 2-core box a
    couple of runs at once fill both cores (one run alone leaves one idle while a single process imports,
    builds data or writes); many more only add context switches and waits in the collectives.
    ``wait(name)`` keeps starting runs while it waits for ``name``; ``close()`` kills what still runs."""

    def __init__(self, starters: dict, limit: int, uncounted=()):
        self.pending = list(starters.items())  # [(name, () -> Popen)]
        self.limit, self.uncounted = limit, set(uncounted)
        self.procs: dict = {}
        self.started: dict = {}

    def _pump(self) -> None:
        running = [n for n, p in self.procs.items() if p.poll() is None and n not in self.uncounted]
        while self.pending and (self.pending[0][0] in self.uncounted or len(running) < self.limit):
            name, start = self.pending.pop(0)
            self.procs[name], self.started[name] = start(), time.monotonic()
            if name not in self.uncounted:
                running.append(name)

    def wait(self, name: str, timeout: float = 300) -> tuple:
        """→ (returncode, stdout, stderr) of ``name``; ``timeout`` counts from the run's start (and bounds
        the wait for a free slot too)."""
        if name not in self.procs and not any(n == name for n, _ in self.pending):
            raise KeyError(name)
        asked = time.monotonic()
        while True:
            self._pump()
            p = self.procs.get(name)
            if p is not None and (p.poll() is not None or time.monotonic() > self.started[name] + timeout):
                return finish({name: p}, timeout=max(1.0, self.started[name] + timeout - time.monotonic()))[name]
            if p is None and time.monotonic() > asked + timeout:
                running = [n for n, q in self.procs.items() if q.poll() is None]
                raise AssertionError(f"{name} did not get to start in {timeout} s: {running} still running")
            time.sleep(0.05)

    def close(self) -> None:
        self.pending.clear()
        for p in self.procs.values():
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait()


def kill_tree(pid: int, sig=signal.SIGKILL) -> None:
    """Signal a process and all its descendants (torchrun starts each worker in its own session,
    so killing torchrun's process group would leave the workers running)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += child_pids(p)
    for p in reversed(seen):  # workers first, then torchrun
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def describe(res) -> str:
    rc, so, se = res
    return f"exit {rc}\nstdout:\n{so[-3000:]}\nstderr:\n{se[-3000:]}"


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            so, se = output(proc)
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}\n{so[-3000:]}\n{se[-3000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def metric_rows(run_dir: Path) -> list[dict]:
    import json

    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    rows = []
    for ln in f.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except ValueError:  # a line being written
            break
    return [r for r in rows if r.get("split", "train") == "train"]


def child_pids(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid (after "pid (comm) state")
                kids.append(int(d.name))
    return kids


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The worker process of ``rank`` under a torchrun process (from its environment)."""
    for pid in child_pids(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


class LatestWatcher(threading.Thread):
    """Polls ``<root>/latest`` while a run goes on; records every time it names an incomplete checkpoint,
    and (step of the newest metrics row, finished step dirs) snapshots."""

    def __init__(self, root: Path, run_dir: Path, nranks: int):
        super().__init__(daemon=True)
        self.root, self.run_dir, self.nranks = Path(root), Path(run_dir), nranks
        self.bad: list[str] = []
        self.snapshots: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = []
        self.stop = threading.Event()

    def _complete(self, d: Path) -> bool:
        return ((d / "meta.json").exists() and (d / ".metadata").exists()
                and all((d / "rng" / f"rank_{r:05d}.pt").exists() for r in range(self.nranks))
                and any(d.glob("*.distcp")))

    def run(self):
        while not self.stop.is_set():
            pointer = self.root / "latest"
            try:
                name = pointer.read_text().strip() if pointer.exists() else None
            except OSError:
                name = None
            if name is not None and not self._complete(self.root / name):
                again = pointer.read_text().strip()
                if again == name:  # not just pruned after `latest` moved on
                    self.bad.append(name)
            rows = metric_rows(self.run_dir)
            names = tuple(sorted(p.name for p in self.root.iterdir())) if self.root.exists() else ()
            self.snapshots.append((rows[-1]["step"] if rows else 0, names, (name,)))
            time.sleep(0.02)


# --------------------------------------------------------------------------- crafted pickles
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_calling_os_system(marker: Path) -> bytes:
    """The classic payload: REDUCE on posix.system."""
    return pickle.dumps(_RunsCode(marker), protocol=2)


def pickle_dotted_os_system(marker: Path) -> bytes:
    """Protocol-4 STACK_GLOBAL with a dotted name that reaches os.system *through* an allowed DCP module."""
    def s(text: str) -> bytes:
        b = text.encode()
        return b"\x8c" + struct.pack("<B", len(b)) + b

    return (b"\x80\x04" + s("torch.distributed.checkpoint.filesystem") + s("os.system") + b"\x93"
            + s(f"touch {marker}") + b"\x85" + b"R" + b".")

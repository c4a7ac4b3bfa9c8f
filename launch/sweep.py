#!/usr/bin/env python
"""Hydra-style sweeps driven from outside the ranks: one torchrun per setting, run one after another.

    python launch/sweep.py --nproc 2 train.lr=1e-4,3e-4 model=tiny,base -- parallel.tensor=2 train.max_steps=100

Comma-separated values sweep (cartesian product); arguments after ``--`` are passed to every run.
Each run gets ``run_dir=<root>/<n>-<setting>``; a summary of final losses is printed at the end.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def expand(sweep_args: list[str]) -> list[list[str]]:
    axes = []
    for arg in sweep_args:
        if "=" not in arg:
            raise SystemExit(f"error: sweep argument {arg!r} is not key=v1,v2,...")
        key, values = arg.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def last_loss(run_dir: Path):
    try:
        lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except OSError:
        return None
    train = [r for r in lines if r.get("split", "train") == "train"]
    return train[-1].get("loss") if train else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun --nproc_per_node)")
    p.add_argument("--root", default=f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--dry-run", action="store_true")
    args, sweep = p.parse_known_args(argv)
    results = []
    for n, setting in enumerate(expand(sweep)):
        tag = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(setting)) or "base"
        run_dir = Path(args.root) / f"{n}-{tag}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "megatron_bert.train", *common, *setting, f"run_dir={run_dir}"]
        print("+", " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        results.append((setting, rc, last_loss(run_dir)))
    for setting, rc, loss in results:
        print(f"{' '.join(setting) or '(base)':40s} exit {rc}  final loss {loss}")
    return max((rc for _, rc, _ in results), default=0)


if __name__ == "__main__":
    sys.exit(main())

"""Run a bench script with Inductor config overrides, for A/B runs without touching the trainer.

    python bench/with_inductor.py triton.mix_order_reduction_split_size=64 -- bench/bench_pretrain.py --compile ...

Values are Python literals (``64``, ``False``, ``None``). The trainer sets some Inductor options
itself (multi-kernel, FX graph cache) only when their environment variables are unset; overrides
given here are applied before it runs and are not touched by it unless they name those options.
"""
from __future__ import annotations

import ast
import runpy
import sys


def main():
    if "--" not in sys.argv:
        raise SystemExit("usage: with_inductor.py KEY=VALUE... -- SCRIPT [ARGS...]")
    cut = sys.argv.index("--")
    overrides, rest = sys.argv[1:cut], sys.argv[cut + 1:]
    import torch._inductor.config as config

    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = getattr(node, part)
        if not hasattr(node, leaf):
            raise SystemExit(f"Inductor has no config option {key!r} in this torch version")
        setattr(node, leaf, ast.literal_eval(value))
        print(f"inductor config {key} = {value}", flush=True)
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()

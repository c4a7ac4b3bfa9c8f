"""Inspect or consolidate a sharded checkpoint (one process, no GPU, any saved TP/DP).

    python -m megatron_bert.checkpoint inspect PATH
    python -m megatron_bert.checkpoint consolidate PATH OUT.pt [--model-only]

PATH is a ``step_<N>`` directory or a checkpoint root (its ``latest`` is used).

``inspect`` prints step, consumed samples, the TP/DP layout it was saved at, the best evaluation so far
(checkpoint.best_metric), whether the optimizer state is in DP slices (optim.distributed_optimizer), the
model config and every tensor's name / global shape / dtype, from ``meta.json`` and the DCP metadata only
(no tensor data is read). PATH may also be a ``latest`` or ``best`` pointer file.

``consolidate`` writes one file with full (unsharded) tensors::

    {"model": {param_name: tensor}, "optimizer": {"<param_name>.exp_avg" / ".exp_avg_sq" / ".step": tensor},
     "meta": {...meta.json, JSON types only...}}

loadable with ``torch.load(OUT, weights_only=True)``. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def inspect(path, out=None) -> None:
    from .manager import read_meta, resolve_checkpoint
    from .sharded import tensor_index

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    index = tensor_index(ckpt)
    out = out or sys.stdout
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"checkpoint: {ckpt.resolve()}")
    p(f"step: {meta.get('step')}")
    p(f"consumed_samples: {meta.get('consumed_samples')}")
    p(f"saved with: TP={meta.get('saved_tp')} DP={meta.get('saved_dp')}")
    if meta.get("head"):
        p(f"head: {meta['head']}")
    best = meta.get("best")
    if best:
        p(f"best evaluation so far: {best['metric']} = {best['value']:.6g} at step {best['step']} ({best['mode']})")
    if ((meta.get("config") or {}).get("optim") or {}).get("distributed_optimizer") and (meta.get("saved_dp") or 1) > 1:
        p(f"optimizer state: fp32 masters and moments in DP slices (optim.distributed_optimizer, DP={meta['saved_dp']})")
    model = meta.get("model") or {}
    p("model config:")
    for k, v in model.items():
        p(f"  {k}: {v}")
    n_model = sum(_numel(s) for k, (s, _, _) in index.items() if k.startswith("model."))
    p(f"tensors: {len(index)} ({n_model / 1e6:.2f}M model parameters)")
    width = max((len(k) for k in index), default=0)
    for k, (shape, dtype, chunks) in sorted(index.items()):
        dt = str(dtype).replace("torch.", "")
        p(f"  {k:<{width}}  {_fmt_shape(shape):<14} {dt}" + (f"  ({chunks} shards)" if chunks > 1 else ""))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _json_safe(obj):
    """meta.json content as plain JSON types (so weights_only=True can load it)."""
    return json.loads(json.dumps(obj, default=str))


def consolidate(path, out, model_only: bool = False) -> Path:
    import torch

    from .manager import read_meta, resolve_checkpoint
    from .sharded import CheckpointError, read_full_state, tensor_index

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    keys = {k for k in tensor_index(ckpt) if k.startswith("model.") or (not model_only and k.startswith("optim."))}
    full = read_full_state(ckpt, keys=keys)
    result = {"model": {}, "optimizer": {}, "meta": _json_safe(meta)}
    for k, v in full.items():
        if k.startswith("model."):
            result["model"][k[len("model."):]] = v
        else:
            result["optimizer"][k[len("optim."):]] = v
    if model_only:
        del result["optimizer"]
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory: give a file name such as {out / 'consolidated.pt'}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_bert.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("inspect", help="print step, layout, model config and tensor shapes (no tensor reads)")
    sp.add_argument("path")
    sp = sub.add_parser("consolidate", help="write one torch.save file of full tensors + meta")
    sp.add_argument("path")
    sp.add_argument("out")
    sp.add_argument("--model-only", action="store_true", help="leave out the optimizer moments")
    args = parser.parse_args(argv)
    debug = os.environ.get("MEGATRON_BERT_DEBUG") == "1"
    from .sharded import CheckpointError

    try:
        if args.command == "inspect":
            inspect(args.path)
        else:
            out = consolidate(args.path, args.out, args.model_only)
            print(f"wrote {out}")
    except BrokenPipeError:  # e.g. `inspect ... | head`
        return 0
    except (CheckpointError, OSError, ValueError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m megatron_bert.convert {import-megatron,export-hf,import-hf} SRC OUT``.

Errors print as one line ``error: ...`` on stderr with exit code 2 (a traceback only with
``MEGATRON_BERT_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MISSING_HINT = {
    "import-megatron": "give a Megatron-LM checkpoint directory, release zip or .pt file",
    "export-hf": "give one of our checkpoints (a root holding `latest`, or a step_<N> directory)",
    "import-hf": "give a Hugging Face model folder (config.json + weights)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_bert.convert",
                                description="Convert BERT checkpoints between Megatron-LM, this project and Hugging Face.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{import-megatron,export-hf,import-hf}")
    m = sub.add_parser("import-megatron", help="Megatron-LM BERT checkpoint (release zip, directory or .pt) → ours")
    m.add_argument("src", metavar="SRC")
    m.add_argument("out", metavar="OUT", help="checkpoint root to write (step_0/ + latest)")
    m.add_argument("--vocab-file", help="the tokenizer (vocab.txt or .model): sets the true vocabulary size, "
                                        "and is copied next to the checkpoint")
    m.add_argument("--vocab-size", type=int, help="the true (unpadded) vocabulary size")
    m.add_argument("--num-attention-heads", type=int, help="needed only when the checkpoint saves no args")
    m.add_argument("--force", action="store_true", help="write even if OUT already holds checkpoints")
    e = sub.add_parser("export-hf", help="our checkpoint (any TP size) → Hugging Face MegatronBert folder")
    e.add_argument("src", metavar="CKPT", help="checkpoint root (uses latest) or a step_<N> directory")
    e.add_argument("out", metavar="OUT")
    i = sub.add_parser("import-hf", help="Hugging Face MegatronBert folder → our checkpoint")
    i.add_argument("src", metavar="HF_DIR")
    i.add_argument("out", metavar="OUT")
    i.add_argument("--force", action="store_true", help="write even if OUT already holds checkpoints")
    return p


def run(args) -> str:
    from . import export_hf, import_hf, import_megatron

    if args.command == "import-megatron":
        path = import_megatron(args.src, args.out, vocab_file=args.vocab_file, vocab_size=args.vocab_size,
                               num_attention_heads=args.num_attention_heads, force=args.force)
    elif args.command == "export-hf":
        path = export_hf(args.src, args.out)
    else:
        path = import_hf(args.src, args.out, force=args.force)
    return str(path)


def fail(msg: str) -> int:
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("MEGATRON_BERT_DEBUG") == "1"
    if not Path(args.src).exists() and not debug:  # answer before loading torch
        return fail(f"{args.src} does not exist: {MISSING_HINT[args.command]}")
    from ..checkpoint import CheckpointError
    from ..config import ModelConfigError
    from .common import ConversionError

    try:
        print(f"wrote {run(args)}")
    except (ConversionError, CheckpointError, ModelConfigError, OSError) as e:
        if debug:
            raise
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

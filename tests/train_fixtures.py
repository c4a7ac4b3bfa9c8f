"""A small pretraining dataset (synthetic prose → SentencePiece → mmap index) and subprocess helpers
for end-to-end trainer tests. Built once per test session."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the model reads a sentence and predicts masked words from context while the trainer keeps "
          "track of loss gradients checkpoints ranks shards tensors layers heads attention values queries "
          "keys tokens vocabulary learning rate warmup decay optimizer moments parallel data pipeline corpus "
          "python library module function class method argument return value error message file path "
          "number string list dictionary object iterator generator exception import package version").split()


def write_corpus(path: Path, docs: int = 160, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            sents = []
            for _ in range(rng.randint(3, 8)):
                words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
                sents.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")
    return path


def build_dataset(root: Path) -> dict:
    """→ {"prefix": ..., "tokenizer": ...}; reuses what is already in ``root``."""
    from megatron_bert.data.sentencepiece_tok import train_sentencepiece
    from megatron_bert.preprocess import preprocess

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    model = root / "spm.model"
    prefix = root / "docs"
    if not corpus.exists():
        write_corpus(corpus)
    if not model.exists():
        sentences = []
        for line in corpus.read_text().splitlines():
            sentences += [s.strip() + "." for s in json.loads(line)["text"].split(".") if s.strip()]
        train_sentencepiece(sentences, root / "spm", vocab_size=300, input_sentence_size=10_000, num_threads=1)
    if not Path(str(prefix) + ".idx").exists():
        preprocess(str(corpus), str(prefix), str(model), workers=1, log=lambda s: None)
    return {"prefix": str(prefix), "tokenizer": str(model)}


def base_overrides(data: dict, run_dir: Path, **extra) -> list[str]:
    ov = {
        "model": "tiny", "model.hidden_size": 64, "model.num_layers": 2, "model.num_attention_heads": 4,
        "data": "bert", "data.prefix": data["prefix"], "data.tokenizer": data["tokenizer"],
        "data.cache_dir": str(run_dir / "cache"), "data.seq_length": 64, "data.num_workers": 0,
        "train.device": "cpu", "train.max_steps": 6, "train.micro_batch_size": 4, "train.global_batch_size": 8,
        "train.lr": 1e-3, "train.log_interval": 1, "train.eval_interval": 1000, "train.eval_iters": 1,
        "optim.warmup_steps": 2, "run_dir": str(run_dir), "checkpoint.save_interval": 0,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def train(overrides: list[str], nproc: int = 1, timeout: float = 240, extra_torchrun: list[str] | None = None):
    if nproc == 1 and not extra_torchrun:
        cmd = [sys.executable, "-m", "megatron_bert.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *(extra_torchrun or ["--standalone"]),
               f"--nproc_per_node={nproc}", "-m", "megatron_bert.train", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split", "train") == split]


def resume_dir(checkpoints: Path, run_dir: Path, step: int = 6) -> Path:
    """``run_dir`` holding only ``checkpoints``' step ``step`` as its latest: a run there resumes from it."""
    import shutil

    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / f"step_{step}", run_dir / "checkpoints" / f"step_{step}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step}")
    return run_dir

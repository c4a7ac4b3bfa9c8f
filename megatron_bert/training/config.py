"""Hydra configs: compose ``configs/`` with command-line overrides, check them against a typed schema.

We use Hydra's compose API rather than ``@hydra.main``: ranks must not change directory or write
their own output folders, and a bad value must cost one clear line before any process group exists.
Rank 0 writes the resolved config to ``<run_dir>/.hydra/`` itself.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and how to fix it."""


@dataclass
class ModelSchema:
    name: str = "tiny"
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02
    activation: str = "gelu"


@dataclass
class ParallelSchema:
    tensor: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    dropout_impl: str = "auto"


@dataclass
class DataSchema:
    name: str = "quickstart"
    prefix: Optional[Any] = None  # PATH, [PATH, ...] or [WEIGHT, PATH, ...] (data/blend.py)
    valid_prefix: Optional[Any] = None  # a separate validation corpus (same forms as prefix)
    tokenizer: Optional[str] = None
    cache_dir: Optional[str] = None
    seq_length: int = 128
    valid_fraction: float = 0.02
    binary_head: str = "sop"
    masked_lm_prob: float = 0.15
    whole_word_masking: bool = False
    max_ngrams: int = 1  # n-gram (span) masking: spans of up to this many words/tokens
    ngram_distribution: str = "harmonic"  # span lengths: harmonic (Megatron-LM) | geometric (SpanBERT)
    short_seq_prob: float = 0.1
    num_workers: int = 0


@dataclass
class TaskSchema:
    name: str = "pretrain"
    pretrained: Optional[str] = None
    # fine-tuning (ignored by pretraining)
    dataset: Optional[str] = None  # e.g. mnli, sst2, generic (glue); conll (ner); squad version auto
    data_dir: Optional[str] = None
    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    test_file: Optional[str] = None
    labels: Optional[list] = None
    max_seq_length: Optional[int] = None  # null = data.seq_length
    epochs: Optional[float] = None  # alternative to train.max_steps
    mode: str = "train"  # train | evaluate | predict
    predictions_file: Optional[str] = None
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    num_choices: int = 4
    regression: bool = False  # glue dataset=generic: float labels, MSE loss (named datasets know their type)
    version_2_with_negative: Optional[bool] = None  # squad: null = decide from the data


@dataclass
class OptimSchema:
    name: str = "adamw"  # adamw | lamb (the optim= group picks it with its defaults)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: str = "linear"
    warmup_fraction: float = 0.01
    warmup_steps: Optional[int] = None
    min_lr: float = 0.0
    decay_fraction: float = 0.1
    decay_style: str = "linear"
    distributed_optimizer: bool = False
    grad_reduce_dtype: str = "fp32"


@dataclass
class TrainSchema:
    max_steps: int = 1000
    max_time: Optional[Any] = None
    micro_batch_size: int = 8
    global_batch_size: int = 32
    lr: float = 1e-4
    seed: int = 1234
    precision: str = "fp32"
    device: str = "auto"
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    dist_timeout: float = 600.0  # seconds any collective may wait (every process group) before the run fails
    max_bad_steps: int = 5
    early_stop_patience: int = 0  # evaluations without a better checkpoint.best_metric before stopping (0 = off)
    heartbeat_interval: float = 60.0  # seconds; 0 = off (RELIABILITY.md)
    compile: bool = False  # GPU: torch.compile each transformer layer (fuses the elementwise work)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    cuda_graph: bool = False  # GPU, pretraining: capture the whole training step as CUDA graphs and replay it
    prune_last_layer: bool = True  # pretraining: the last layer computes only [CLS] and the MLM targets (same loss)
    profile_steps: Optional[list] = None  # [START, END]: torch.profiler trace of those steps (training/profiling.py)
    profile_ranks: list = field(default_factory=lambda: [0])


@dataclass
class CheckpointSchema:
    dir: Optional[str] = None
    save_interval: int = 500
    resume: str = "auto"
    keep: int = 3
    async_save: bool = False
    on_error: str = "exit"  # a failed save (disk full, permission denied): exit | retry
    retries: int = 3  # on_error=retry: further attempts before giving up
    retry_wait: float = 10.0  # seconds between attempts
    best_metric: Optional[str] = None  # an eval metric: keep the best checkpoint by it (<dir>/best)
    best_mode: str = "auto"  # auto (min for *loss*, else max) | max | min


@dataclass
class Schema:
    model: ModelSchema = field(default_factory=ModelSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    task: TaskSchema = field(default_factory=TaskSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    run_dir: str = MISSING


def config_dir() -> Path:
    """``$MEGATRON_BERT_CONFIGS`` or the repository's ``configs/``."""
    env = os.environ.get("MEGATRON_BERT_CONFIGS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").exists():
        raise ConfigError(f"config directory {path} has no config.yaml: set MEGATRON_BERT_CONFIGS to the repo's configs/")
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    msg = lines[0]
    for ln in lines[1:]:
        if ln.startswith("full_key:") and ln.split(":", 1)[1].strip():
            msg += f" ({ln})"
    return msg


def compose(overrides: list[str]) -> DictConfig:
    """configs/ + overrides → a validated, typed DictConfig (interpolations resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # hydra's parse / composition errors
        msg = _first_line(e)
        text = str(e)
        if "Available options in" in text:  # unknown group option, e.g. model=huge
            group = text.split("Available options in '", 1)[1].split("'", 1)[0]
            options = []
            for ln in text.split("Available options in", 1)[1].splitlines()[1:]:
                if not ln.startswith(("\t", "  ")) or not ln.strip():
                    break
                options.append(ln.strip())
            msg = f"{msg} — {group}= must be one of: {', '.join(options)}"
        elif "To append to your config use +" in text or "not in struct" in text:
            msg += " — check the key's spelling (see configs/ for the known keys)"
        raise ConfigError(msg) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        schema = OmegaConf.structured(Schema)
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except Exception as e:  # omegaconf validation: unknown key, wrong type
        raise ConfigError(_first_line(e)) from None
    OmegaConf.set_readonly(cfg, False)
    return cfg


def parse_time(value) -> float | None:
    """Seconds from a number or "HH:MM:SS" / "MM:SS"."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    parts = str(value).split(":")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"train.max_time={value!r} is not seconds or HH:MM:SS") from None
    secs = 0.0
    for n in nums:
        secs = secs * 60 + n
    return secs


_CHOICES = {
    "parallel.recompute": ("none", "selective", "full"),
    "parallel.dropout_impl": ("auto", "keyed", "native"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.lr_schedule": ("linear", "cosine", "constant", "wsd", "inverse_sqrt"),
    "optim.decay_style": ("linear", "cosine", "1-sqrt"),
    "optim.grad_reduce_dtype": ("fp32", "param"),
    "optim.name": ("adamw", "lamb"),
    "checkpoint.best_mode": ("auto", "max", "min"),
    "data.binary_head": ("sop", "nsp", "none"),
    "data.ngram_distribution": ("harmonic", "geometric"),
    "task.mode": ("train", "evaluate", "predict"),
    "checkpoint.on_error": ("exit", "retry"),
}


def validate(cfg: DictConfig, world_size: int) -> None:
    """Checks that need no process group: run on every rank before any distributed work."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    t, tr = cfg.parallel.tensor, cfg.train
    if t < 1:
        raise ConfigError(f"parallel.tensor={t} must be >= 1")
    if world_size % t:
        raise ConfigError(f"parallel.tensor={t} does not divide the world size {world_size}: "
                          f"run with a multiple of {t} processes (torchrun --nproc_per_node) or change parallel.tensor")
    dp = world_size // t
    if tr.micro_batch_size < 1 or tr.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={tr.global_batch_size} is not divisible by train.micro_batch_size "
            f"({tr.micro_batch_size}) x data-parallel size ({dp}): choose a multiple of {tr.micro_batch_size * dp}")
    if not tr.lr > 0:
        raise ConfigError(f"train.lr={tr.lr} must be > 0")
    if tr.max_steps < 0:
        raise ConfigError(f"train.max_steps={tr.max_steps} must be >= 0")
    for key in ("log_interval", "eval_interval", "max_bad_steps"):
        if tr[key] < 1:
            raise ConfigError(f"train.{key}={tr[key]} must be >= 1")
    if not tr.dist_timeout > 0:
        raise ConfigError(f"train.dist_timeout={tr.dist_timeout} must be > 0 (seconds a collective may wait)")
    for key, value in (("train.heartbeat_interval", tr.heartbeat_interval), ("train.eval_iters", tr.eval_iters),
                       ("checkpoint.retries", cfg.checkpoint.retries),
                       ("checkpoint.retry_wait", cfg.checkpoint.retry_wait)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    seq, max_pos = cfg.data.seq_length, cfg.model.max_position_embeddings
    for key, value in (("data.seq_length", seq), ("task.max_seq_length", cfg.task.max_seq_length)):
        if value is not None and not 1 <= value <= max_pos:
            raise ConfigError(f"{key}={value} must be in [1, model.max_position_embeddings={max_pos}]: "
                              "shorten the sequences or raise model.max_position_embeddings")
    from ..data.blend import BlendError, parse_blend

    for key in ("prefix", "valid_prefix"):
        if cfg.data[key] is not None:
            try:
                parse_blend(cfg.data[key], f"data.{key}")  # a ListConfig is a Sequence
            except BlendError as e:
                raise ConfigError(str(e)) from None
    if not 0 < cfg.data.masked_lm_prob <= 1:
        raise ConfigError(f"data.masked_lm_prob={cfg.data.masked_lm_prob} must be in (0, 1]")
    if cfg.data.max_ngrams < 1:
        raise ConfigError(f"data.max_ngrams={cfg.data.max_ngrams} must be >= 1 (1 masks single words/tokens; "
                          "Megatron-LM uses 3, SpanBERT 10 with data.ngram_distribution=geometric)")
    if cfg.optim.min_lr < 0 or cfg.optim.min_lr > tr.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} must be in [0, train.lr]")
    if not 0 <= cfg.optim.warmup_fraction <= 1:
        raise ConfigError(f"optim.warmup_fraction={cfg.optim.warmup_fraction} must be in [0, 1]")
    if not 0 <= cfg.optim.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={cfg.optim.decay_fraction} must be in [0, 1] (the share of "
                          "train.max_steps that optim.lr_schedule=wsd decays over)")
    parse_time(tr.max_time)
    _check_profile(tr.profile_steps, tr.profile_ranks, world_size)
    if tr.cuda_graph and cfg.task.name != "pretrain":
        raise ConfigError(f"train.cuda_graph=true supports task=pretrain only (got task={cfg.task.name}): "
                          "drop train.cuda_graph for fine-tuning")
    if tr.cuda_graph and tr.precision == "fp16":
        raise ConfigError("train.cuda_graph=true does not support train.precision=fp16 (its loss scale is decided "
                          "on the host each step): use train.precision=bf16")
    if cfg.parallel.sequence_parallel and cfg.data.seq_length % t:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} must be divisible by parallel.tensor={t} "
                          "with parallel.sequence_parallel=true")
    if cfg.checkpoint.keep < 0 or cfg.checkpoint.save_interval < 0:
        raise ConfigError("checkpoint.keep and checkpoint.save_interval must be >= 0")
    if cfg.checkpoint.best_metric is not None:
        if not cfg.checkpoint.dir:
            raise ConfigError(f"checkpoint.best_metric={cfg.checkpoint.best_metric} needs checkpoint.dir (the best "
                              "checkpoint is kept there): set checkpoint.dir or drop checkpoint.best_metric")
        if tr.eval_iters <= 0:
            raise ConfigError(f"checkpoint.best_metric={cfg.checkpoint.best_metric} needs evaluations, but "
                              f"train.eval_iters={tr.eval_iters} turns them off: set train.eval_iters >= 1")
    if cfg.optim.grad_reduce_dtype == "param" and not cfg.optim.distributed_optimizer:
        raise ConfigError("optim.grad_reduce_dtype=param is a mode of the distributed optimizer: add "
                          "optim.distributed_optimizer=true (or keep optim.grad_reduce_dtype=fp32)")
    if tr.early_stop_patience < 0:
        raise ConfigError(f"train.early_stop_patience={tr.early_stop_patience} must be >= 0 (0 = off)")
    if tr.early_stop_patience and cfg.checkpoint.best_metric is None:
        raise ConfigError(f"train.early_stop_patience={tr.early_stop_patience} needs checkpoint.best_metric (the "
                          "metric that must improve), e.g. checkpoint.best_metric=accuracy")
    if cfg.checkpoint.dir and Path(cfg.checkpoint.dir).exists() and not Path(cfg.checkpoint.dir).is_dir():
        raise ConfigError(f"checkpoint.dir={cfg.checkpoint.dir} is not a directory: point it at a directory")
    from ..config import NAMED_SIZES, ModelConfigError

    try:
        model_config(cfg, vocab_size=cfg.model.vocab_size or 128).validate(t)
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.name not in NAMED_SIZES and cfg.model.name != "custom":
        raise ConfigError(f"model={cfg.model.name} is unknown: use one of {', '.join(NAMED_SIZES)}")


def _check_profile(steps, ranks, world_size: int) -> None:
    if steps is not None:
        ok = len(steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
        if not ok or not 1 <= steps[0] <= steps[1]:
            raise ConfigError(f"train.profile_steps={list(steps)} must be [START,END] with 1 <= START <= END "
                              "(step numbers as in metrics.jsonl), e.g. train.profile_steps=[10,12]")
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < world_size]
    if bad:
        raise ConfigError(f"train.profile_ranks={list(ranks)} names ranks outside 0..{world_size - 1}: "
                          "give global ranks of this run, e.g. train.profile_ranks=[0]")


def model_config(cfg: DictConfig, vocab_size: int):
    from ..config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k in fields}
    d["vocab_size"] = cfg.model.vocab_size or vocab_size
    return ModelConfig(**d)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)

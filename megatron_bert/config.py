"""Model architecture config, named sizes, and the runtime options that are not architecture."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VOCAB_PAD_MULTIPLE = 128  # independent of TP, so a checkpoint reshards to any TP dividing 128
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


class ModelConfigError(ValueError):
    """A model configuration or input that cannot work; the message says how to fix it."""


def pad_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    vocab_size: int = 30522  # the tokenizer's size; the embedding table is padded (see padded_vocab_size)
    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layernorm_epsilon: float = 1e-5  # Megatron-LM's default (HF's MegatronBert config says 1e-12)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02
    activation: str = "gelu"  # exact erf GeLU, as Megatron-LM and HF "gelu"
    num_binary_labels: int = 2  # sentence-order / next-sentence head

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        self.validate()

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, tensor_parallel: int = 1) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by model.num_attention_heads "
                f"({self.num_attention_heads}): pick a head count that divides the hidden size")
        if self.activation not in ACTIVATIONS:
            raise ModelConfigError(f"model.activation={self.activation!r} is unknown: use one of {', '.join(ACTIVATIONS)}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ModelConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if tensor_parallel > 1:
            if self.num_attention_heads % tensor_parallel:
                raise ModelConfigError(
                    f"model.num_attention_heads ({self.num_attention_heads}) is not divisible by parallel.tensor "
                    f"({tensor_parallel}): each rank must own whole heads; choose a TP size dividing the head count")
            if self.ffn_hidden_size % tensor_parallel:
                raise ModelConfigError(
                    f"model.ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by parallel.tensor ({tensor_parallel})")
            if VOCAB_PAD_MULTIPLE % tensor_parallel:
                raise ModelConfigError(
                    f"parallel.tensor ({tensor_parallel}) must divide {VOCAB_PAD_MULTIPLE} (the vocabulary padding)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config keys {unknown}: known keys are {sorted(known)}")
        return cls(**d)


# The Megatron-LM paper's BERT table (345M, 1.3B, 3.9B) plus base and a tiny CPU model.
NAMED_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_layers=2, num_attention_heads=4),
    "base": dict(hidden_size=768, num_layers=12, num_attention_heads=12),
    "345m": dict(hidden_size=1024, num_layers=24, num_attention_heads=16),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_attention_heads=32),
    "3.9b": dict(hidden_size=2560, num_layers=48, num_attention_heads=40),
}


def named_config(name: str, **overrides) -> ModelConfig:
    if name not in NAMED_SIZES:
        raise ModelConfigError(f"unknown model size {name!r}: use one of {', '.join(NAMED_SIZES)}")
    return ModelConfig(**{**NAMED_SIZES[name], **overrides})


@dataclass
class ModelRuntime:
    """How the model runs (not what it is): parallel tricks and dropout implementation."""

    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective (attention core) | full (whole layer)
    dropout_impl: str = "keyed"  # keyed: TP/DP-invariant masks; native: torch RNG + fused SDPA dropout
    seed: int = 1234  # for initialisation and keyed dropout
    validate_inputs: bool = True  # range-check ids (a host sync; the trainer checks on the host instead)
    fuse_elementwise: bool = False  # torch.compile the bias+GeLU and bias+dropout+residual epilogues (GPU)

    def __post_init__(self):
        if self.recompute not in ("none", "selective", "full"):
            raise ModelConfigError(f"parallel.recompute={self.recompute!r} is unknown: use none, selective or full")
        if self.dropout_impl not in ("keyed", "native"):
            raise ModelConfigError(f"dropout_impl={self.dropout_impl!r} is unknown: use keyed or native")

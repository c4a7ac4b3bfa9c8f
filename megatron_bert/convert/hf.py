"""``export-hf`` / ``import-hf``: our checkpoints ↔ Hugging Face ``MegatronBert*`` folders.

The two models compute the same function: both are pre-LN with a final LayerNorm and no embedding
LayerNorm, with the LM decoder tied to the word embeddings. Only names and the fused QKV differ
(ours: one [3h, h] projection in per-head order; HF: separate query / key / value).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, read_model_state, write_model_checkpoint
from ..config import ModelConfig, ModelConfigError, pad_vocab_size
from .common import (HEAD_PARTS, LAYER_PREFIX, LM_BIAS, WORD_EMB, ConversionError, check_names, copy_tokenizer,
                     expected_names, from_prefixed, fuse_qkv, note, prepare_output_root, repad_vocab,
                     reports_notes, safe_torch_load, split_qkv, to_prefixed)
from .safetensors_io import load_file, save_file

ARCHITECTURES = {
    "model": "MegatronBertModel",
    "pretraining": "MegatronBertForPreTraining",
    "masked_lm": "MegatronBertForMaskedLM",
    "causal_lm": "MegatronBertForCausalLM",
    "next_sentence": "MegatronBertForNextSentencePrediction",
    "sequence_classification": "MegatronBertForSequenceClassification",
    "multiple_choice": "MegatronBertForMultipleChoice",
    "token_classification": "MegatronBertForTokenClassification",
    "question_answering": "MegatronBertForQuestionAnswering",
}
HEAD_OF_ARCH = {v: k for k, v in ARCHITECTURES.items()}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
ACT_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu"}
EXTRA_KEY = "megatron_bert"  # our own block in config.json: true vocab size, head and head kwargs
_HEAD_MODULES = {"lm_head.dense": "cls.predictions.transform.dense",
                 "lm_head.layernorm": "cls.predictions.transform.LayerNorm",
                 "binary_head": "cls.seq_relationship", "classifier": "classifier", "qa_outputs": "qa_outputs"}
_LAYER_MODULES = {"input_layernorm": "attention.ln", "attention.dense": "attention.output.dense",
                  "post_attention_layernorm": "ln", "mlp.dense_h_to_4h": "intermediate.dense",
                  "mlp.dense_4h_to_h": "output.dense"}
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def name_map(head: str, num_layers: int) -> dict[str, str]:
    """Our (``bert.``-prefixed) parameter name → HF name, for everything except the fused QKV."""
    m = {k: k for k in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                        "bert.embeddings.token_type_embeddings.weight")}
    mods = {"bert.encoder.final_layernorm": "bert.encoder.ln", "bert.pooler.dense": "bert.pooler.dense",
            **_HEAD_MODULES}
    for i in range(num_layers):
        for ours, theirs in _LAYER_MODULES.items():
            mods[f"{LAYER_PREFIX}{i}.{ours}"] = f"bert.encoder.layer.{i}.{theirs}"
    for ours, theirs in mods.items():
        for leaf in ("weight", "bias"):
            m[f"{ours}.{leaf}"] = f"{theirs}.{leaf}"
    m[LM_BIAS] = "cls.predictions.bias"
    if head == "model":  # the bare HF MegatronBertModel has no "bert." prefix either
        m = {k: v[len("bert."):] if v.startswith("bert.") else v for k, v in m.items()}
    return m


def _qkv_names(head: str, i: int) -> tuple[str, str]:
    ours = f"{LAYER_PREFIX}{i}.attention.query_key_value"
    theirs = f"bert.encoder.layer.{i}.attention.self"
    return ours, theirs[len("bert."):] if head == "model" else theirs


# --------------------------------------------------------------------------- export
def hf_config(cfg: ModelConfig, head: str, head_kwargs: dict, meta: dict) -> dict:
    c = {
        "architectures": [ARCHITECTURES[head]], "model_type": "megatron-bert",
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": ACT_TO_HF[cfg.activation], "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout, "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.init_std, "layer_norm_eps": cfg.layernorm_epsilon,
        "pad_token_id": 0, "tie_word_embeddings": True, "is_decoder": head == "causal_lm", "dtype": "float32",
        EXTRA_KEY: {"vocab_size": cfg.vocab_size, "head": head, "head_kwargs": head_kwargs},
    }
    if head in ("sequence_classification", "token_classification"):
        n = int(head_kwargs.get("num_labels", 2))
        names = meta.get("label_names") or [f"LABEL_{i}" for i in range(n)]
        if len(names) != n:
            raise ConversionError(f"checkpoint meta has {len(names)} label_names for {n} labels: fix meta.json")
        c["num_labels"] = n
        c["id2label"] = {str(i): str(x) for i, x in enumerate(names)}
        c["label2id"] = {str(x): i for i, x in enumerate(names)}
        if head == "sequence_classification" and head_kwargs.get("problem_type"):
            c["problem_type"] = head_kwargs["problem_type"]
    if head == "question_answering":
        c["num_labels"] = 2
    return c


def to_hf_state(state: dict, cfg: ModelConfig, head: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    out = {}
    for i in range(cfg.num_layers):
        ours, theirs = _qkv_names(head, i)
        for leaf in ("weight", "bias"):
            for part, t in zip(("query", "key", "value"), split_qkv(state.pop(f"{ours}.{leaf}"), cfg.num_attention_heads)):
                out[f"{theirs}.{part}.{leaf}"] = t
    names = name_map(head, cfg.num_layers)
    for k, v in state.items():
        out[names[k]] = v.float().contiguous()
    return out


@reports_notes
def export_hf(ckpt, out) -> Path:
    try:
        state, meta = read_model_state(ckpt)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    head = meta.get("head", "pretraining")
    head_kwargs = dict(meta.get("head_kwargs") or {})
    if head not in ARCHITECTURES:
        raise ConversionError(f"checkpoint head {head!r} has no Hugging Face MegatronBert class")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ModelConfigError) as e:
        raise ConversionError(f"checkpoint meta.json has no usable model config ({e}): the checkpoint is incomplete") from None
    state = to_prefixed(state, head)
    check_names(state, head, cfg.num_layers, f"checkpoint {ckpt}")
    if HEAD_PARTS[head]["extra"] == "binary_head" and cfg.num_binary_labels != 2:
        raise ConversionError(f"the binary head has {cfg.num_binary_labels} outputs but Hugging Face's has 2")
    if head in ("sequence_classification", "token_classification"):
        head_kwargs["num_labels"] = int(state["classifier.weight"].shape[0])
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state(state, cfg, head)
    save_file(tensors, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, head, head_kwargs, meta), indent=2) + "\n")
    tok = meta.get("tokenizer")
    if tok:
        copied = copy_tokenizer(tok, out)
        if copied is None:
            note(f"tokenizer {tok} named in the checkpoint meta was not found: copy its vocab.txt to {out} yourself")
        elif copied.suffix == ".model":
            note(f"copied the SentencePiece model {copied.name}: transformers has no MegatronBert tokenizer class "
                 "for it, load it with sentencepiece (or a tokenizer class of your choice)")
        elif copied.name == "vocab.txt":
            (out / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "BertTokenizer", "do_lower_case": _vocab_is_lower(copied),
                 "model_max_length": cfg.max_position_embeddings}, indent=2) + "\n")
    return out


def _vocab_is_lower(vocab: Path) -> bool:
    """No upper-case word pieces (ignoring [SPECIAL] tokens) → an uncased vocabulary."""
    for line in vocab.read_text(encoding="utf-8", errors="replace").splitlines():
        t = line.strip()
        if t and not (t.startswith("[") and t.endswith("]")) and t != t.lower():
            return False
    return True


# --------------------------------------------------------------------------- import
def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        files = []
        if (d / index_name).is_file():
            try:
                files = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConversionError(f"{d / index_name} is not a valid weight index") from None
        elif (d / single).is_file():
            files = [single]
        if not files:
            continue
        state = {}
        for f in files:
            p = d / f
            if not p.is_file():
                raise ConversionError(f"{p} (listed in {index_name}) is missing: the download is incomplete")
            if p.suffix == ".safetensors":
                part = load_file(p)
            else:
                part = safe_torch_load(lambda p=p: open(p, "rb"), str(p))
                if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                    raise ConversionError(f"{p} is not a state dict of tensors")
            state.update(part)
        return state
    raise ConversionError(f"{d} has no model.safetensors or pytorch_model.bin: not a Hugging Face model folder")


def _config_from_hf(c: dict, label: str) -> tuple[ModelConfig, str]:
    model_type = c.get("model_type")
    if model_type == "bert":
        raise ConversionError(f"{label} is a plain BERT (model_type 'bert', post-LN), which our pre-LN model "
                              "cannot represent exactly: only megatron-bert (pre-LN) checkpoints convert exactly")
    if model_type != "megatron-bert":
        raise ConversionError(f"{label} has model_type {model_type!r}: only 'megatron-bert' checkpoints can be imported")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{label} uses position_embedding_type={c['position_embedding_type']!r}: "
                              "only absolute position embeddings are supported")
    if c.get("add_cross_attention"):
        raise ConversionError(f"{label} has cross-attention layers, which our encoder-only model lacks")
    act = c.get("hidden_act", "gelu")
    if act not in ACT_FROM_HF:
        raise ConversionError(f"{label} uses hidden_act={act!r}: supported are {', '.join(ACT_FROM_HF)}")
    archs = c.get("architectures") or [None]
    if archs[0] is not None and archs[0] not in HEAD_OF_ARCH:
        raise ConversionError(f"{label} is a {archs[0]}, which has no matching head here: "
                              f"supported are {', '.join(HEAD_OF_ARCH)}")
    hidden = int(c.get("hidden_size", 1024))
    try:
        cfg = ModelConfig(
            vocab_size=int(c.get("vocab_size", 29056)), hidden_size=hidden,
            num_layers=int(c.get("num_hidden_layers", 24)), num_attention_heads=int(c.get("num_attention_heads", 16)),
            ffn_hidden_size=int(c.get("intermediate_size", 4 * hidden)),
            max_position_embeddings=int(c.get("max_position_embeddings", 512)),
            type_vocab_size=int(c.get("type_vocab_size", 2)), layernorm_epsilon=float(c.get("layer_norm_eps", 1e-12)),
            hidden_dropout=float(c.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(c.get("attention_probs_dropout_prob", 0.1)),
            init_std=float(c.get("initializer_range", 0.02)), activation=ACT_FROM_HF[act])
    except (ModelConfigError, TypeError, ValueError) as e:
        raise ConversionError(f"{label}/config.json describes an invalid model: {e}") from None
    return cfg, HEAD_OF_ARCH.get(archs[0])


def guess_head(hf: dict, c: dict) -> str:
    """The head of a folder whose config.json names no architecture, from its weight names."""
    keys = set(hf)
    lm = any(k.startswith("cls.predictions.") for k in keys)
    nsp = any(k.startswith("cls.seq_relationship.") for k in keys)
    if lm:
        return "pretraining" if nsp else "causal_lm" if c.get("is_decoder") else "masked_lm"
    if nsp:
        return "next_sentence"
    if "qa_outputs.weight" in keys:
        return "question_answering"
    if "classifier.weight" in keys:
        if not any("pooler." in k for k in keys):
            return "token_classification"
        rows = hf["classifier.weight"].shape[0]
        return "multiple_choice" if rows == 1 and int(c.get("num_labels", 2)) != 1 else "sequence_classification"
    return "model"


def from_hf_state(hf: dict, cfg: ModelConfig, head: str, label: str) -> dict[str, torch.Tensor]:
    hf = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    if head == "model":
        hf = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in hf.items()}
    else:
        hf = {k if k.startswith(("bert.", "cls.", "classifier.", "qa_outputs.")) else f"bert.{k}": v
              for k, v in hf.items()}
    tied = {k: hf.pop(k) for k in _TIED if k in hf}
    state, missing = {}, []
    for i in range(cfg.num_layers):
        ours, theirs = _qkv_names(head, i)
        for leaf in ("weight", "bias"):
            keys = [f"{theirs}.{p}.{leaf}" for p in ("query", "key", "value")]
            if all(k in hf for k in keys):
                state[f"{ours}.{leaf}"] = fuse_qkv(*(hf.pop(k).float() for k in keys), cfg.num_attention_heads)
            else:
                missing += [k for k in keys if k not in hf]
    reverse = {v: k for k, v in name_map(head, cfg.num_layers).items()}
    unexpected = [k for k in hf if k not in reverse]
    state.update({reverse[k]: v.float() for k, v in hf.items() if k in reverse})
    if LM_BIAS not in state and "cls.predictions.decoder.bias" in tied and HEAD_PARTS[head]["lm"]:
        state[LM_BIAS] = tied["cls.predictions.decoder.bias"].float()
    if "cls.predictions.decoder.weight" in tied and WORD_EMB in state:
        if not torch.equal(tied["cls.predictions.decoder.weight"].float(), state[WORD_EMB]):
            raise ConversionError(f"{label} has an LM decoder that is not tied to the word embeddings: "
                                  "our model always ties them")
    names = name_map(head, cfg.num_layers)
    missing += [names[k] for k in expected_names(head, cfg.num_layers)
                if k not in state and "query_key_value" not in k]
    if unexpected or missing:
        parts = ([f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"] if unexpected else []) + \
                ([f"missing keys ({len(missing)}): {', '.join(missing[:10])}"] if missing else [])
        raise ConversionError(f"{label} does not match its config / architecture: {'; '.join(parts)}")
    return state


@reports_notes
def import_hf(hf_dir, out, *, force: bool = False) -> Path:
    d = Path(hf_dir)
    if not d.exists():
        raise ConversionError(f"{d} does not exist: give a Hugging Face model folder (config.json + weights)")
    if not (d / "config.json").is_file():
        raise ConversionError(f"{d} has no config.json: not a Hugging Face model folder")
    out_root = prepare_output_root(out, force)
    try:
        c = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{d / 'config.json'} is not valid JSON") from None
    cfg, head = _config_from_hf(c, str(d))
    hf = _read_hf_weights(d)
    if head is None:
        head = guess_head(hf, c)
        note(f"{d}/config.json names no architecture: the weights look like {ARCHITECTURES[head]}")
    state = from_hf_state(hf, cfg, head, str(d))
    rows = state[WORD_EMB].shape[0]
    if rows != cfg.vocab_size:
        raise ConversionError(f"{d}: config.json says vocab_size={cfg.vocab_size} but the word embeddings have "
                              f"{rows} rows: the config does not belong to these weights")
    extra = c.get(EXTRA_KEY) or {}
    true_vocab = extra.get("vocab_size")
    if isinstance(true_vocab, int) and 0 < true_vocab <= rows and pad_vocab_size(true_vocab) == pad_vocab_size(rows):
        cfg.vocab_size = true_vocab  # exported by us: restore the tokenizer's size
    if LM_BIAS in state and state[LM_BIAS].shape[0] != rows:
        raise ConversionError(f"{d}: cls.predictions.bias has {state[LM_BIAS].shape[0]} entries for {rows} tokens")
    repad_vocab(state, cfg.vocab_size, str(d))
    check_names(state, head, cfg.num_layers, str(d))
    if "binary_head.weight" in state:
        cfg.num_binary_labels = int(state["binary_head.weight"].shape[0])
    head_kwargs = {}
    if head in ("sequence_classification", "token_classification"):
        head_kwargs["num_labels"] = int(state["classifier.weight"].shape[0])
        if head == "sequence_classification" and c.get("problem_type"):
            head_kwargs["problem_type"] = c["problem_type"]
    meta = {"model": cfg.to_dict(), "head": head, "head_kwargs": head_kwargs,
            "converted_from": {"format": "huggingface", "path": str(d), "architecture": ARCHITECTURES[head]}}
    id2label = c.get("id2label")
    if head_kwargs.get("num_labels") and isinstance(id2label, dict) and len(id2label) == head_kwargs["num_labels"]:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        if names != [f"LABEL_{i}" for i in range(len(names))]:
            meta["label_names"] = names
    tok = copy_tokenizer(d, out_root / "tokenizer")
    if tok is not None:
        meta["tokenizer"] = str(tok.resolve())
    return write_model_checkpoint(out_root, from_prefixed(state, head), meta)

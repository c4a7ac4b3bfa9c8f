"""``import-megatron``: a Megatron-LM BERT checkpoint (release zip, checkpoint directory, or one .pt)
→ one of our checkpoints (head "pretraining", or "masked_lm" when trained without the binary head).

Megatron-LM saves one ``model_optim_rng.pt`` per tensor-parallel rank under
``<root>/{release,iter_XXXXXXX}/mp_rank_XX/``. Each holds ``model`` (nested dicts or flat dotted
keys), ``args`` (an argparse.Namespace) and ``checkpoint_version``, which fixes the row order of the
fused QKV projection (see common.QKV_ORDERS).
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import torch

from ..checkpoint import write_model_checkpoint
from ..config import ModelConfig, ModelConfigError
from .common import (LAYER_PREFIX, LM_BIAS, POS_EMB, TYPE_EMB, WORD_EMB, ConversionError, check_names,
                     copy_tokenizer, note, prepare_output_root, qkv_to_per_head, repad_vocab, reports_notes,
                     safe_torch_load)

RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d+)(?:_(\d+))?")
_ITER_DIR = re.compile(r"release|iter_\d+")


# --------------------------------------------------------------------------- finding the rank files
def _pick_group(groups: dict, latest: dict, src) -> tuple:
    """groups: (base, iteration) → {tp_rank: (pp_rank, opener)}; latest: base → iteration named there."""
    bases = sorted({b for b, _ in groups})
    if len(bases) > 1:
        raise ConversionError(f"{src} holds several Megatron checkpoints ({', '.join(b or '.' for b in bases)}): "
                              "point at one of them")
    base = bases[0]
    iters = [it for b, it in groups if b == base]
    if base in latest:
        want = latest[base]
        if (base, want) not in groups:
            raise ConversionError(f"latest_checkpointed_iteration.txt in {src} names {want!r} but "
                                  f"{want}/mp_rank_00/{RANK_FILE} is missing: the checkpoint is incomplete")
        return groups[(base, want)], want
    if len(iters) == 1:
        return groups[(base, iters[0])], iters[0]
    if "release" in iters:
        return groups[(base, "release")], "release"
    best = max((it for it in iters if it), key=lambda s: int(s[5:]))
    note(f"{src} holds several iterations and no latest_checkpointed_iteration.txt: using {best}")
    return groups[(base, best)], best


def _latest_name(text: str) -> str | None:
    text = text.strip()
    if text == "release":
        return "release"
    return f"iter_{int(text):07d}" if text.isdigit() else None


def _collect(paths: list[str], opener_for) -> tuple[dict, dict]:
    groups: dict = {}
    latest: dict = {}
    for p in paths:
        parts = p.split("/")
        if parts[-1] == "latest_checkpointed_iteration.txt":
            latest["/".join(parts[:-1])] = opener_for(p)
            continue
        if parts[-1] != RANK_FILE or len(parts) < 2 or not _RANK_DIR.fullmatch(parts[-2]):
            continue
        m = _RANK_DIR.fullmatch(parts[-2])
        has_iter = len(parts) >= 3 and _ITER_DIR.fullmatch(parts[-3])
        it = parts[-3] if has_iter else None
        base = "/".join(parts[:-3] if has_iter else parts[:-2])
        pp = int(m.group(2)) if m.group(2) is not None else 0
        groups.setdefault((base, it), {}).setdefault(int(m.group(1)), []).append((pp, opener_for(p)))
    return groups, latest


def find_rank_files(src) -> tuple[list, str]:
    """→ ([opener for TP rank 0, 1, ...], a label). Each opener returns a fresh binary file object."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src} does not exist: give a Megatron-LM checkpoint directory, release zip or .pt file")
    if src.is_dir() and (src / RANK_FILE).is_file():  # pointed at an mp_rank_XX directory itself
        src = src / RANK_FILE
    if src.is_dir():
        pats = [f"{'*/' * d}mp_rank_*/{RANK_FILE}" for d in range(3)] + ["latest_checkpointed_iteration.txt",
                                                                          "*/latest_checkpointed_iteration.txt"]
        paths = sorted({p.relative_to(src).as_posix() for pat in pats for p in src.glob(pat)})
        groups, latest_files = _collect(paths, lambda p: (lambda: open(src / p, "rb")))
        where = f"directory {src}"
    elif zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            names = z.namelist()
        if not any(n.endswith("/" + RANK_FILE) for n in names) and any(n.endswith("data.pkl") for n in names):
            return [lambda: open(src, "rb")], str(src)  # a torch zip-format .pt, not a release archive

        def zip_member(name):
            cache: list = []

            def opener():
                if not cache:  # read the member once, from the archive, into memory (not to disk)
                    with zipfile.ZipFile(src) as z:
                        cache.append(z.read(name))
                return io.BytesIO(cache[0])
            return opener
        groups, latest_files = _collect(names, zip_member)
        where = f"zip archive {src}"
        if not groups:
            raise ConversionError(f"{src} is a zip archive without any mp_rank_XX/{RANK_FILE}: "
                                  "not a Megatron-LM checkpoint release")
    else:
        return [lambda: open(src, "rb")], str(src)
    if not groups:
        raise ConversionError(f"{src} holds no mp_rank_XX/{RANK_FILE}: not a Megatron-LM checkpoint directory")
    latest = {}
    for base, opener in latest_files.items():
        with opener() as f:
            name = _latest_name(f.read().decode("utf-8", "replace"))
        if name is not None:
            latest[base] = name
    ranks, it = _pick_group(groups, latest, where)
    if any(pp for entries in ranks.values() for pp, _ in entries) or any(len(e) > 1 for e in ranks.values()):
        raise ConversionError(f"{where} is pipeline-parallel (mp_rank_TT_PPP directories): only tensor-parallel "
                              "checkpoints are supported; merge the pipeline stages with Megatron-LM first")
    if sorted(ranks) != list(range(len(ranks))):
        raise ConversionError(f"{where} has tensor-parallel ranks {sorted(ranks)} in {it}: some mp_rank_XX are missing")
    label = f"{src}" + (f" ({it})" if it else "")
    return [ranks[r][0][1] for r in range(len(ranks))], label


# --------------------------------------------------------------------------- key names
_TOP = {
    "language_model.embedding.word_embeddings.weight": WORD_EMB,
    "language_model.embedding.position_embeddings.weight": POS_EMB,
    "language_model.embedding.tokentype_embeddings.weight": TYPE_EMB,
    "lm_head.bias": LM_BIAS,
}
_MODULES = {  # Megatron module path → ours (each with .weight and .bias)
    "language_model.transformer.final_layernorm": "bert.encoder.final_layernorm",
    "language_model.encoder.final_layernorm": "bert.encoder.final_layernorm",
    "language_model.transformer.final_norm": "bert.encoder.final_layernorm",
    "language_model.encoder.final_norm": "bert.encoder.final_layernorm",
    "language_model.pooler.dense": "bert.pooler.dense",
    "lm_head.dense": "lm_head.dense",
    "lm_head.layernorm": "lm_head.layernorm",
    "binary_head": "binary_head",
}
_LAYER_MODULES = {
    "input_layernorm": "input_layernorm", "input_norm": "input_layernorm",
    "attention.query_key_value": "attention.query_key_value",
    "self_attention.query_key_value": "attention.query_key_value",
    "attention.dense": "attention.dense", "self_attention.dense": "attention.dense",
    "post_attention_layernorm": "post_attention_layernorm", "post_attention_norm": "post_attention_layernorm",
    "mlp.dense_h_to_4h": "mlp.dense_h_to_4h", "mlp.dense_4h_to_h": "mlp.dense_4h_to_h",
}
_LAYER_RE = re.compile(r"language_model\.(?:transformer|encoder)\.layers\.(\d+)\.(.+)\.(weight|bias)")


def our_name(key: str) -> str | None:
    if key in _TOP:
        return _TOP[key]
    module, _, leaf = key.rpartition(".")
    if leaf in ("weight", "bias") and module in _MODULES:
        return f"{_MODULES[module]}.{leaf}"
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2) in _LAYER_MODULES:
        return f"{LAYER_PREFIX}{m.group(1)}.{_LAYER_MODULES[m.group(2)]}.{m.group(3)}"
    return None


def _flatten(d, prefix: str, out: dict) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, key + ".", out)
        elif v is not None and not key.endswith("_extra_state"):
            out[key] = v


def rank_state(ckpt, label: str) -> dict[str, torch.Tensor]:
    """One rank's file → {our name: local shard} (Megatron's row orders untouched)."""
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{label} holds a {type(ckpt).__name__}, not a Megatron-LM checkpoint dict")
    if "model" in ckpt:
        section = ckpt["model"]
    elif any(k.startswith("model0") for k in ckpt):
        raise ConversionError(f"{label} uses virtual pipeline stages (model0, model1, ...): not supported")
    else:
        section = {k: v for k, v in ckpt.items() if k not in ("args", "checkpoint_version", "iteration",
                                                                "optimizer", "rng_state", "opt_param_scheduler",
                                                                "lr_scheduler", "num_floating_point_operations_so_far")}
    if not isinstance(section, dict):
        raise ConversionError(f"{label} has no model state dict: not a Megatron-LM checkpoint")
    flat: dict = {}
    _flatten(section, "", flat)
    state, unknown = {}, []
    for key, v in flat.items():
        k = key
        while k.startswith(("model.", "module.")):
            k = k.split(".", 1)[1]
        name = our_name(k)
        if name is None or not isinstance(v, torch.Tensor):
            unknown.append(key)
        elif name in state:
            raise ConversionError(f"{label} holds {name} twice (both old and new Megatron names): "
                                  "the file is inconsistent")
        else:
            state[name] = v
    if unknown or not state:
        shown = ", ".join(unknown[:10]) or "(no tensors)"
        hint = ("expected Megatron-LM BERT names such as language_model.embedding.word_embeddings.weight"
                if not any("linear_qkv" in k for k in unknown) else
                "this looks like a Megatron-Core (mcore) model, which is not supported: save it with the legacy model")
        raise ConversionError(f"{label} has an unknown key layout; unexpected keys ({len(unknown)}): {shown} — {hint}")
    return state


# --------------------------------------------------------------------------- merging TP ranks
_CAT0 = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
_CAT1 = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def qkv_order(version) -> str:
    v = float(version or 0)
    return "split_first" if v < 1.0 else "head_dim_first" if v < 2.0 else "per_head"


def merge_ranks(states: list[dict], heads: int, version) -> dict[str, torch.Tensor]:
    tp = len(states)
    if heads % tp:
        raise ConversionError(f"{heads} attention heads cannot be split over {tp} tensor-parallel ranks: "
                              "pass the right --num-attention-heads")
    order = qkv_order(version)
    names = list(states[0])
    for r, s in enumerate(states[1:], 1):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))
            raise ConversionError(f"tensor-parallel rank {r} holds different tensors than rank 0 (e.g. {diff[0]}): "
                                  "the shards do not belong together")
    full = {}
    for name in names:
        parts = [s[name].float() for s in states]
        if name.endswith(("query_key_value.weight", "query_key_value.bias")):
            full[name] = torch.cat([qkv_to_per_head(p, heads // tp, order) for p in parts])
        elif name in (WORD_EMB, LM_BIAS) or name.endswith(_CAT0):
            full[name] = torch.cat(parts) if tp > 1 else parts[0]
        elif name.endswith(_CAT1):
            full[name] = torch.cat(parts, dim=1) if tp > 1 else parts[0]
        else:
            full[name] = parts[0]
    return full


# --------------------------------------------------------------------------- config
def _arg(args, *names, default=None):
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return default


def _refuse_unsupported(args, label: str) -> None:
    checks = [
        (_arg(args, "apply_residual_connection_post_layernorm", default=False),
         "apply_residual_connection_post_layernorm (residual taken after the LayerNorm)"),
        (_arg(args, "position_embedding_type", default="learned_absolute") != "learned_absolute",
         f"position_embedding_type={_arg(args, 'position_embedding_type')}"),
        (_arg(args, "normalization", default="LayerNorm") != "LayerNorm",
         f"normalization={_arg(args, 'normalization')}"),
        (_arg(args, "swiglu", default=False), "swiglu"),
        (_arg(args, "squared_relu", default=False), "squared_relu"),
        (_arg(args, "untie_embeddings_and_output_weights", default=False), "untied output embeddings"),
        ((_arg(args, "pipeline_model_parallel_size", default=1) or 1) > 1, "pipeline parallelism"),
    ]
    for bad, what in checks:
        if bad:
            raise ConversionError(f"{label} was trained with {what}, which our model cannot represent exactly")


def _check_args(full: dict, args, label: str) -> None:
    """Sizes saved in args must agree with the tensors (vocabulary, hidden, layers, FFN, positions)."""
    layers = {k.split(".")[3] for k in full if k.startswith(LAYER_PREFIX)}
    h_to_4h = full.get(f"{LAYER_PREFIX}0.mlp.dense_h_to_4h.weight")
    have = {"padded_vocab_size": (full[WORD_EMB].shape[0], "padded vocabulary"),
            "hidden_size": (full[WORD_EMB].shape[1], "hidden size"), "num_layers": (len(layers), "layer count")}
    if h_to_4h is not None:
        have["ffn_hidden_size"] = (h_to_4h.shape[0], "FFN size")
    if POS_EMB in full:
        have["max_position_embeddings"] = (full[POS_EMB].shape[0], "position count")
    for arg, (n, what) in have.items():
        want = _arg(args, arg)
        if want is not None and int(want) != n:
            raise ConversionError(f"{label}: args say the {what} is {want} but the tensors have {n}: "
                                  "the shards do not match their args")


def infer_config(full: dict, args, heads: int, vocab_size: int, label: str) -> ModelConfig:
    hidden = full[WORD_EMB].shape[1]
    num_layers = len({k.split(".")[3] for k in full if k.startswith(LAYER_PREFIX)})
    ffn = full[f"{LAYER_PREFIX}0.mlp.dense_h_to_4h.weight"].shape[0] if num_layers else 4 * hidden
    max_pos = full[POS_EMB].shape[0]
    act = "gelu_tanh" if _arg(args, "openai_gelu", default=False) else "gelu"
    try:
        return ModelConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_attention_heads=heads,
            ffn_hidden_size=ffn, max_position_embeddings=max_pos, type_vocab_size=full[TYPE_EMB].shape[0],
            layernorm_epsilon=float(_arg(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)),
            hidden_dropout=float(_arg(args, "hidden_dropout", default=0.1)),
            attention_dropout=float(_arg(args, "attention_dropout", default=0.1)),
            init_std=float(_arg(args, "init_method_std", default=0.02)), activation=act,
            num_binary_labels=full["binary_head.weight"].shape[0] if "binary_head.weight" in full else 2)
    except ModelConfigError as e:
        raise ConversionError(f"{label}: the inferred model config is invalid: {e}") from None


# --------------------------------------------------------------------------- entry point
@reports_notes
def import_megatron(src, out, *, vocab_file=None, vocab_size: int | None = None, num_attention_heads: int | None = None,
                    force: bool = False) -> Path:
    out_root = prepare_output_root(out, force)
    openers, label = find_rank_files(src)
    states, first = [], {}
    for r, opener in enumerate(openers):
        where = f"{label} rank {r}" if len(openers) > 1 else label
        ckpt = safe_torch_load(opener, where)
        states.append(rank_state(ckpt, where))
        if r == 0:  # keep the small entries; optimizer / RNG state is dropped with the rest
            first = {k: ckpt.get(k) for k in ("args", "checkpoint_version", "iteration")}
        del ckpt
    args = first.get("args")
    version = first.get("checkpoint_version") or 0
    _refuse_unsupported(args, label)
    tp_args = _arg(args, "tensor_model_parallel_size", "model_parallel_size")
    if tp_args is not None and int(tp_args) != len(states):
        raise ConversionError(f"{label} was saved with tensor parallel size {tp_args} but {len(states)} rank file(s) "
                              "were found: point at the checkpoint directory holding every mp_rank_XX")
    if WORD_EMB not in states[0]:
        raise ConversionError(f"{label} has no word embeddings (language_model.embedding.word_embeddings.weight)")
    hidden = states[0][WORD_EMB].shape[1]
    heads = num_attention_heads or _arg(args, "num_attention_heads")
    if heads is None:
        heads = max(1, hidden // 64)
        note(f"{label} saves no args: assuming {heads} attention heads (head size 64); "
             "pass --num-attention-heads if that is wrong")
    full = merge_ranks(states, int(heads), version)
    _check_args(full, args, label)
    if TYPE_EMB not in full:  # trained without token types: a zero table of 2 changes nothing
        full[TYPE_EMB] = torch.zeros(2, hidden)
        note("no token-type embeddings in the checkpoint: using a zero table of 2 types")
    head = "pretraining" if "binary_head.weight" in full else "masked_lm"
    if head == "masked_lm" and "bert.pooler.dense.weight" in full:
        note("the checkpoint has a pooler but no binary head: importing as masked_lm without the pooler")
        del full["bert.pooler.dense.weight"], full["bert.pooler.dense.bias"]
    tokenizer = None
    if vocab_file is not None:
        try:
            from ..data.tokenizers import load_tokenizer
            tok_size = load_tokenizer(vocab_file).vocab_size
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read tokenizer {vocab_file}: {e}") from None
        if vocab_size is not None and vocab_size != tok_size:
            raise ConversionError(f"--vocab-size {vocab_size} disagrees with {vocab_file} ({tok_size} tokens)")
        vocab_size = tok_size
        tokenizer = vocab_file
    padded = full[WORD_EMB].shape[0]
    true_vocab = vocab_size or _arg(args, "vocab_size") or padded
    check_names(full, head, len({k.split(".")[3] for k in full if k.startswith(LAYER_PREFIX)}), label)
    cfg = infer_config(full, args, int(heads), int(true_vocab), label)
    repad_vocab(full, cfg.vocab_size, label)
    meta = {"model": cfg.to_dict(), "head": head, "head_kwargs": {},
            "converted_from": {"format": "megatron-lm", "path": str(src), "checkpoint_version": float(version or 0),
                               "iteration": first.get("iteration"), "tensor_parallel": len(states)}}
    if tokenizer is not None:
        meta["tokenizer"] = str(copy_tokenizer(tokenizer, out_root / "tokenizer").resolve())
    if vocab_size is None and _arg(args, "vocab_size") is None:
        note(f"the true vocabulary size is unknown: model.vocab_size = {padded} (the padded size); "
             "pass --vocab-file or --vocab-size to set it")
    return write_model_checkpoint(out_root, full, meta)

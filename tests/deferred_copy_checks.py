"""Rank-side check for test_flat_adamw.py (2 gloo ranks): the deferred grad copy under sequence parallelism."""
import os

from gpu_steps import run_steps, small_config


def sequence_parallel_steps(ps, run_dir: str, steps: int = 3) -> dict:
    """TP + SP, bf16 on CPU, the flat AdamW forced on, one micro-batch a step: with the grad copy
    deferred (the SP sum of the LayerNorm and bias grads then done on the bf16 grads, in fp32) and with
    it off (``MEGATRON_BERT_DEFER_GRAD_COPY=0``: the sum on the fp32 master grads). Returns each way's
    losses, grad norms and whether its steps read the bf16 grads."""
    from megatron_bert.training import trainer as trainer_mod

    trainer_mod.use_flat_adamw = lambda device, capturable=False: True
    out = {}
    for defer in ("1", "0"):
        os.environ["MEGATRON_BERT_DEFER_GRAD_COPY"] = defer
        cfg = small_config(steps, global_batch_size=4, micro_batch_size=4, device="cpu")
        cfg.run_dir = os.path.join(run_dir, f"defer{defer}")
        cfg.model.update(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                         attention_dropout=0.0)
        cfg.data.update(seq_length=32)
        cfg.parallel.update(tensor=ps.tp_size, sequence_parallel=True)
        stats = []
        losses, trainer = run_steps(cfg, ps, steps, record=stats)
        out[defer] = {"losses": losses, "norms": [s["grad_norm"] for s in stats],
                      "read_bf16": trainer.optimizer.deferred is not None}
    return out

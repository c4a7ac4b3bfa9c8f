"""``train.compile`` on GPU: which parts of the model torch.compile takes, and Inductor's settings.

Each transformer layer compiles as two graphs, the attention half and the MLP half
(TransformerLayer.compile_halves says why two); the embeddings, the heads and the loss stay eager
(the cross-entropy has its own compiled form). At TP>1 the layer's collectives are functional c10d
ops (parallel/comm.py), traced inside those graphs (tests/test_model.py).

A/B switches (environment): ``MEGATRON_BERT_COMPILE_UNIT=layer`` one graph per layer;
``MEGATRON_BERT_COMPILE_TP=0`` at TP>1 only the fused epilogues compile, as before the functional
collectives (the column-parallel backward's async collectives broke the graphs then, and the compiled
layer ran slower than eager on H100: BENCHMARKS.md); ``MEGATRON_BERT_ASYNC_TP=1`` with sequence
parallel, Inductor's micro-pipelined TP (each all-gather → GEMM and GEMM → reduce-scatter split into
chunks whose transfers overlap the other chunks' GEMMs, through symmetric memory; not yet measured).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from parallel import ParallelState


def compile_model(model, mode: str, ps: ParallelState, sequence_parallel: bool, log: Callable[[str], None]) -> None:
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_MULTI_KERNEL" not in os.environ:
        # Let Inductor time the persistent and the looped variant of each LayerNorm-style reduction
        # on first use and keep the faster (about 1% of a 345M step on H200).
        inductor_config.triton.multi_kernel = 1
        if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
            # torch 2.11 fails to reload a cached graph that holds multi-kernels (TypeError in
            # MultiKernelCall.cache_file_path: the unpickled kernel lost its hash lock), so a second
            # run on a warm cache crashed (H200, BENCHMARKS.md). Inductor then regenerates the graph
            # each start (~10 s at 345M; Triton's binaries stay cached).
            inductor_config.fx_graph_cache = False
    if ps.tp_size > 1 and os.environ.get("MEGATRON_BERT_COMPILE_TP", "1") == "0":
        log("train.compile: MEGATRON_BERT_COMPILE_TP=0: at TP>1 only the fused elementwise epilogues compile")
        return
    if ps.tp_size > 1 and os.environ.get("MEGATRON_BERT_ASYNC_TP") == "1":
        if sequence_parallel:
            from torch.distributed._symmetric_memory import enable_symm_mem_for_group

            enable_symm_mem_for_group(ps.tp_group.group_name)
            inductor_config._micro_pipeline_tp = True
            log("train.compile: MEGATRON_BERT_ASYNC_TP=1: micro-pipelined all-gather/reduce-scatter GEMMs")
        else:
            log("train.compile: MEGATRON_BERT_ASYNC_TP=1 needs parallel.sequence_parallel=true; left off")
    halves = os.environ.get("MEGATRON_BERT_COMPILE_UNIT", "half") == "half"
    for layer in model.bert.encoder.layers:
        if halves:
            layer.compile_halves(mode)
        else:  # one graph per layer
            layer.compile(mode=mode)
            layer.forward_fused = torch.compile(layer.forward_fused, mode=mode)

"""Which of a compiled layer's collectives Inductor's micro-pipelined TP (MEGATRON_BERT_ASYNC_TP=1)
could fuse with their GEMMs, read off the traced graphs on CPU (2 gloo ranks, no GPU needed).

The pass (torch/_inductor/fx_passes/micro_pipeline_tp.py) fuses an all-gather whose result is the
left operand of ``mm`` (possibly behind reshapes) and a reduce-scatter fed by ``mm``; the fusion itself
needs NCCL and symmetric memory, so here each half's forward and backward graph is traced with
Inductor's decompositions and the pass's own matchers are asked. Prints, per graph, each all-gather
with the number of matmuls it feeds and each reduce-scatter with whether a matmul produces it.

    python bench/probe_async_tp.py            # the fused-epilogue layout (GPU's), sequence parallel
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from dist_harness import run_distributed  # noqa: E402


def probe(ps):
    from functools import partial

    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.micro_pipeline_tp import (_find_consumer_matmuls, _find_producer_matmul,
                                                             find_all_gather_patterns, find_reduce_scatter_patterns)
    from torch._inductor.fx_passes.post_grad import view_to_reshape

    import model_checks
    from megatron_bert.config import ModelRuntime
    from megatron_bert.model import MegatronBertForPreTraining

    rows = []

    def inspect(gm, _inputs, graph):
        view_to_reshape(gm)  # as Inductor's post-grad passes do before this one
        gathers = [len(_find_consumer_matmuls(m.res_node)) for m in find_all_gather_patterns(gm.graph)]
        scatters = [_find_producer_matmul(m.input_node) is not None for m in find_reduce_scatter_patterns(gm.graph)]
        rows.append((graph, gathers, scatters))
        return gm.forward

    def backend(name):
        return lambda gm, inputs: aot_module_simplified(
            gm, inputs, decompositions=select_decomp_table(),
            fw_compiler=partial(inspect, graph=f"{name} forward"), bw_compiler=partial(inspect, graph=f"{name} backward"))

    cfg = model_checks.tiny_config(num_layers=1)
    model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=7, sequence_parallel=True, fuse_elementwise=True))
    for layer in model.bert.encoder.layers:
        for name in ("attention_block", "mlp_block"):
            setattr(layer, name, torch.compile(getattr(layer, name), backend=backend(name)))
    model(**model_checks.make_batch()).loss.backward()
    return rows


if __name__ == "__main__":
    for graph, gathers, scatters in run_distributed(2, 2, probe)[0]:
        print(f"{graph:28s} all-gathers feeding matmuls: {gathers}   reduce-scatters fed by a matmul: {scatters}")

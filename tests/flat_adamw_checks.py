"""Checks of the flat AdamW Triton kernel that need Triton but no GPU (run by tests/test_flat_adamw.py when
MEGATRON_BERT_TEST_TRITON=1, or by hand):

    TRITON_INTERPRET=1 python tests/flat_adamw_checks.py interpret   # kernel == flat_update_torch, bit for bit
    python tests/flat_adamw_checks.py compile                        # compiles for sm90 (ptxas included)

Prints one ``OK ...`` line per case and exits non-zero on the first failure.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_bert.training import flat_adamw  # noqa: E402

HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


def _state(n: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=g) * 0.05
    grad = torch.randn(n, generator=g) * 3.0
    exp_avg = torch.randn(n, generator=g) * 0.1
    exp_avg_sq = torch.rand(n, generator=g) * 0.01
    exp_avg_sq[::7] = 0.0  # sqrt(0) and the eps path (where no grad came yet: exp_avg is 0 too)
    exp_avg[::7] = 0.0
    grad[::11] = 0.0
    return [master, grad, exp_avg, exp_avg_sq, master.to(dtype)]


def _run(update, tensors, step, lr, scale, found, **hyper):
    t = [x.clone() for x in tensors]
    update(*t, torch.tensor(float(step)), torch.tensor(lr), torch.tensor(scale), torch.tensor(found), **hyper)
    return t


def interpret() -> None:
    cases = [  # (n, step count before, lr, grad_scale, found_inf, weight_decay, 16-bit dtype)
        (flat_adamw.BLOCK * 2 + 123, 0, 1e-3, 1.0, 0.0, 0.01, torch.bfloat16),   # n not a multiple of BLOCK
        (1000, 5, 3e-4, 2.5, 0.0, 0.0, torch.bfloat16),                         # no decay, grad_scale != 1
        (flat_adamw.BLOCK, 41, 1e-2, 0.37, 0.0, 0.1, torch.float16),            # fp16 weights
        (5000, 7, 1e-3, 4.0, 1.0, 0.01, torch.bfloat16),                         # found_inf: nothing changes
        (333, 999_999, 1e-4, 1.0, 0.0, 0.01, torch.bfloat16),                    # large step (b1**step -> 0)
    ]
    for i, (n, step, lr, scale, found, wd, dtype) in enumerate(cases):
        tensors = _state(n, i, dtype)
        hyper = dict(HYPER, weight_decay=wd)
        want = _run(flat_adamw.flat_update_torch, tensors, step, lr, scale, found, **hyper)
        got = _run(flat_adamw.flat_update_triton, tensors, step, lr, scale, found, **hyper)
        for name, w, g in zip(("master", "grad", "exp_avg", "exp_avg_sq"), want, got):
            if not torch.equal(w, g):
                diff = (w.float() - g.float()).abs().max().item()
                raise SystemExit(f"FAIL case {i} ({n=}, {step=}, {found=}, {wd=}): {name} differs (max {diff:.3g})")
        # The interpreter's fp32 -> 16-bit conversion rounds half up instead of to nearest even (the GPU's
        # cvt.rn does round to nearest even: tests/test_gpu_flat_adamw.py checks it): one 16-bit ulp.
        ulp = (want[4].float().abs() * 2.0 ** -(7 if dtype == torch.bfloat16 else 10)).clamp(min=2.0 ** -24)
        if not ((got[4] == want[4]) | ((got[4].float() - want[4].float()).abs() <= ulp)).all():
            raise SystemExit(f"FAIL case {i}: the 16-bit weights are more than one ulp from the master's rounding")
        if found:
            assert all(torch.equal(a, b) for a, b in zip(got, tensors)), "found_inf=1 must leave everything alone"
        else:
            assert not torch.equal(got[0], tensors[0]) and torch.equal(got[1], tensors[1])
        print(f"OK interpret case {i}: n={n} step={step} lr={lr} grad_scale={scale} found_inf={found} wd={wd} "
              f"{str(dtype)[6:]}: master, exp_avg, exp_avg_sq bit-identical to flat_update_torch")
    check_table_kernel([flat_adamw.BLOCK + 5, 70, 3 * flat_adamw.BLOCK, 1, 9 * flat_adamw.BLOCK + 64], 7)


def check_table_kernel(sizes: list[int], seed: int) -> None:
    """The table kernel (16-bit grads read in place, one tensor per program block) against the flat
    kernel on their fp32 copies: master, moments and 16-bit weights bit-identical, the layout's
    alignment gaps untouched."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(n, generator=g) * 0.05).bfloat16()) for n in sizes]
    groups = [params[:2], params[2:]]
    runs = []
    for use_table in (False, True):
        flat = flat_adamw.FlatBuffers([[torch.nn.Parameter(p.detach().clone()) for p in grp] for grp in groups])
        gen = torch.Generator().manual_seed(seed + 1)
        flat.exp_avg.copy_(torch.randn(flat.numel, generator=gen) * 0.01)
        flat.exp_avg_sq.copy_(torch.rand(flat.numel, generator=gen) * 1e-4)
        flat.exp_avg[flat._padding] = 0.0
        flat.exp_avg_sq[flat._padding] = 0.0
        grads16 = [(torch.randn(n, generator=gen) * 2).bfloat16() for n in sizes]
        for k, hyper in enumerate((dict(HYPER, weight_decay=0.01), dict(HYPER, weight_decay=0.0))):
            a, b = flat.group_ranges[k]
            step, lr, scale, found = (torch.tensor(v) for v in (3.0, 1e-3, 1.7, 0.0))
            if use_table:
                flat_adamw.table_update_triton(flat, k, flat.pointer_table(grads16), step, lr, scale, found, **hyper)
            else:
                grad = torch.zeros(flat.numel)
                for o, t in zip(flat.offsets, grads16):
                    grad[o:o + t.numel()] = t.float()
                flat_adamw.flat_update_triton(flat.master[a:b], grad[a:b], flat.exp_avg[a:b], flat.exp_avg_sq[a:b],
                                              flat.weight[a:b], step, lr, scale, found, **hyper)
        runs.append((flat.master, flat.exp_avg, flat.exp_avg_sq, flat.weight))
    for name, want, got in zip(("master", "exp_avg", "exp_avg_sq", "16-bit weight"), *runs):
        if not torch.equal(want, got):
            raise SystemExit(f"FAIL table kernel {sizes}: {name} differs from the flat kernel's")
    print(f"OK interpret table kernel, tensors of {sizes} in 2 groups: bit-identical to the flat kernel on "
          f"fp32 copies of the grads")


def _arg_type(name: str, consts: dict, weight_dtype: str) -> str:
    if name in consts:
        return "constexpr"
    if name.endswith("_ptr"):
        return f"*{weight_dtype}" if name == "weight_ptr" else "*fp32"
    return "i64" if name == "n" else "fp32"


def compile_sm90() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = flat_adamw._adamw_kernel
    scalars = ("step_ptr", "lr_ptr", "scale_ptr", "found_ptr")
    for wdt in ("bf16", "fp16"):
        for wd in (0.0, 0.01):
            consts = flat_adamw.kernel_constexprs(0.9, 0.999, wd)
            sig = {k: _arg_type(k, consts, wdt) for k in kernel.arg_names}
            # what the launcher specialises for flat slices: 16-byte aligned tensors, n a multiple of 16
            attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(kernel.arg_names)
                     if k == "n" or (k.endswith("_ptr") and k not in scalars)}
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": flat_adamw.NUM_WARPS, "enable_fp_fusion": False})
            ptx = k.asm["ptx"]
            assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx and "div.full.f32" not in ptx, "IEEE div/sqrt"
            assert "fma.rn.f32" not in ptx, "fp32 FMA contraction must be off"
            assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, "vectorised loads and stores"
            print(f"OK compile sm90: weight {wdt}, weight_decay {wd}: {len(k.asm['cubin'])} bytes of cubin")
    table = flat_adamw._adamw_table_kernel
    consts = flat_adamw.kernel_constexprs(0.9, 0.999, 0.01)
    del consts["WRITE_WEIGHT"]
    consts["SUBBLOCKS"] = flat_adamw.TABLE_SUBBLOCKS
    types = {"grad_table_ptr": "*i64", "block_flat_ptr": "*i64", "block_count_ptr": "*i32",
             "block_tensor_ptr": "*i32", "block_start_ptr": "*i32", "weight_ptr": "*bf16"}
    sig = {k: "constexpr" if k in consts else types.get(k, "*fp32" if k.endswith("_ptr") else "fp32")
           for k in table.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(table.arg_names) if k.endswith("_ptr")}
    k = triton.compile(ASTSource(fn=table, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": flat_adamw.NUM_WARPS, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    # the grads (through the table) and the flat buffers, vectorised: 16-bit grads 4 at a time at least
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx and "fma.rn.f32" not in ptx
    assert "ld.global.v2.b32" in ptx or "ld.global.v4.b16" in ptx or "ld.global.v2.b16" in ptx, "16-bit grad loads"
    print(f"OK compile sm90: table kernel, weight bf16: {len(k.asm['cubin'])} bytes of cubin")


if __name__ == "__main__":
    {"interpret": interpret, "compile": compile_sm90}[sys.argv[1]]()

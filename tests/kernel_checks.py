"""Checks of the model's Triton kernels (bias + GeLU with its bias-grad column sum, the QKV gradient
pack, the bias + dropout + residual epilogue) that need Triton but no GPU. Run by tests/test_kernels.py when MEGATRON_BERT_TEST_TRITON=1, or:

    TRITON_INTERPRET=1 python tests/kernel_checks.py interpret   # against float64 / torch references
    python tests/kernel_checks.py compile                        # compiles each kernel for sm90

Prints one ``OK ...`` line per case and exits non-zero on the first failure. On a GPU,
tests/test_gpu.py checks the same kernels compiled and inside a compiled layer.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_bert import triton_support  # noqa: E402
from megatron_bert.model import dropout_kernels, gelu_kernels, qkv_kernels  # noqa: E402


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def check_gelu(rows: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    dy = torch.randn(rows, n, generator=g).bfloat16()
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    y64 = torch.nn.functional.gelu(x64 + b64)
    y64.backward(dy.double())
    y = gelu_kernels.bias_gelu(x, b)
    dx, db = gelu_kernels.bias_gelu_backward(dy, x, b)
    errs = (_rel(y, y64), _rel(dx, x64.grad), _rel(db, b64.grad))
    if not (y.dtype == dx.dtype == db.dtype == torch.bfloat16 and max(errs) < 4e-3):
        raise SystemExit(f"FAIL bias_gelu {rows}x{n}: relative errors {errs}")
    print(f"OK interpret bias_gelu {rows}x{n}: y, dx, dbias within {max(errs):.2g} of float64")


def check_qkv_pack(s: int, b: int, heads: int, hd: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # the strides cuDNN's backward hands back: [b, heads, s, hd] laid out as [s, b, heads, hd]
    grads = [torch.randn(s, b, heads, hd, generator=g).bfloat16().permute(1, 2, 0, 3) for _ in range(3)]
    grads[2] = grads[2].contiguous()  # and a plainly contiguous one
    bias = torch.zeros(heads * 3 * hd, dtype=torch.bfloat16)
    packed, dbias = qkv_kernels.qkv_grad_pack(*grads, bias)
    want = torch.stack(grads, 0).permute(3, 1, 2, 0, 4).reshape(s, b, heads * 3 * hd)  # [s, b, heads, 3, hd]
    if not torch.equal(packed, want):
        raise SystemExit(f"FAIL qkv_grad_pack {s=} {b=} {heads=}: the packed gradient differs from torch's stack")
    db = want.float().sum((0, 1)).bfloat16()  # fp32 sums (in another order), rounded once
    ulps = ((dbias.float() - db.float()).abs() / (db.float().abs() * 2.0 ** -7).clamp(min=2.0 ** -30)).max().item()
    if dbias.dtype != torch.bfloat16 or ulps > 1.0:
        raise SystemExit(f"FAIL qkv_grad_pack bias grad: {ulps:.3g} bf16 ulps from the fp32 column sum")
    print(f"OK interpret qkv_grad_pack s={s} b={b} heads={heads} hd={hd}: packed gradient bit-identical, "
          f"bias grad within {ulps:.2g} bf16 ulp of the fp32 column sum")


def _within_ulp(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """bf16 ``a`` equals fp32 ``ref`` rounded, give or take one bf16 ulp (the interpreter rounds
    halves up where the GPU rounds to nearest even)."""
    ulp = (ref.abs() * 2.0 ** -7).clamp(min=2.0 ** -126)
    return bool(((a.float() - ref).abs() <= ulp).all())


def check_bias_dropout_add(shape: tuple, p: float, salt: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, r, dy = (torch.randn(shape, generator=g).bfloat16() for _ in range(3))
    b = torch.randn(shape[-1], generator=g).bfloat16()
    s = torch.tensor([987654321 + seed], dtype=torch.int64)
    out, keep = dropout_kernels.bias_dropout_add(x, b, r, s, p, salt)
    if not torch.equal(keep.flatten(), dropout_kernels.keep_mask(s, x.numel(), p, salt)):
        raise SystemExit(f"FAIL bias_dropout_add {shape}: its mask is not keep_mask's for the same seed")
    scale = 1.0 / (1.0 - p)
    want = r.float() + torch.where(keep, (x.float() + b.float()) * scale, 0.0)
    if out.dtype != torch.bfloat16 or not _within_ulp(out, want):
        raise SystemExit(f"FAIL bias_dropout_add {shape}: out is not residual + (x + b)·keep/(1-p)")
    xt, bt, rt = (t.clone().requires_grad_() for t in (x, b, r))
    dropout_kernels.bias_dropout_add(xt, bt, rt, s, p, salt)[0].backward(dy)
    want_dx = torch.where(keep, dy.float() * scale, 0.0)
    want_db = want_dx.bfloat16().float().reshape(-1, shape[-1]).sum(0)  # eager: the bf16 grad, summed in fp32
    if not (_within_ulp(xt.grad, want_dx) and _within_ulp(bt.grad, want_db) and torch.equal(rt.grad, dy)):
        raise SystemExit(f"FAIL bias_dropout_add backward {shape}: the grads of x, bias or residual differ")
    kept = keep.float().mean().item()
    print(f"OK interpret bias_dropout_add {shape} p={p} salt={salt}: mask = keep_mask's, out, dx, dbias "
          f"within one bf16 ulp, kept {kept:.3f}")


def interpret() -> None:
    # The interpreter cannot time autotune candidates: keep one tile shape of each GeLU kernel.
    for kernel in (gelu_kernels._fwd_kernel, gelu_kernels._bwd_kernel):
        kernel.configs = kernel.configs[:1]
    check_gelu(64 * 3 + 5, 256, 0)    # a ragged last row block
    check_gelu(100, 192, 1)           # columns not a multiple of the tile
    check_qkv_pack(8, 3, 2, 16, 2)    # tokens (24) fewer than a block
    check_qkv_pack(40, 4, 3, 32, 3)   # 160 tokens: 2.5 blocks
    check_bias_dropout_add((70, 3, 96), 0.1, 0, 4)   # 20160 elements: a ragged last program, rows % 64 != 0
    check_bias_dropout_add((16, 2, 256), 0.5, 1, 5)  # salted


def compile_sm90() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(kernel, types: dict, consts: dict, warps: int = 4):
        sig = {k: ("constexpr" if k in consts else types.get(k, "i32")) for k in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(kernel.arg_names) if k.endswith("_ptr")}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        print(f"OK compile sm90: {kernel.fn.__name__} {consts}: {len(k.asm['cubin'])} bytes of cubin")
        return k

    bf = {"x_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "dx_ptr": "*bf16",
          "partial_ptr": "*fp32", "out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16"}
    build(gelu_kernels._fwd_kernel.fn, bf, {"BLOCK_M": 16, "BLOCK_N": 1024}, 8)
    build(gelu_kernels._bwd_kernel.fn, bf, {"BLOCK_M": 64, "SUB_M": 16, "BLOCK_N": 512}, 4)
    build(triton_support._column_sum_kernel, bf, {"N_ROWS": 256, "BLOCK_R": 8, "BLOCK_N": 64})
    build(dropout_kernels._bda_fwd_kernel, {**bf, "r_ptr": "*bf16", "keep_ptr": "*i1", "seed_ptr": "*i64",
                                            "scale": "fp32"},
          {"N_COLS": 1024, "BLOCK": dropout_kernels._BLOCK})
    k = build(qkv_kernels._pack_kernel, {**bf, "n_tokens": "i64", "batch": "i64"},
              {"HEADS": 16, "HEAD_DIM": 64, "ROWS": qkv_kernels._ROWS})
    if "st.global.v4.b32" not in k.asm["ptx"] and "st.global.v2.b32" not in k.asm["ptx"]:
        raise SystemExit("FAIL: the packed gradient is not stored with vector stores")


if __name__ == "__main__":
    {"interpret": interpret, "compile": compile_sm90}[sys.argv[1]]()

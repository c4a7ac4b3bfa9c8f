"""Checks of the word embeddings' backward (embedding_kernels.segment_sums) against float64, in Triton's
interpreter (run by kernel_checks.py interpret) and on the GPU (tests/test_gpu.py)."""
import torch

from megatron_bert.model import embedding_kernels


def embedding_grad_errors(ids: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype, seed: int) -> str:
    """What is wrong with embedding_kernels.segment_sums for ``ids`` (on their device) against a float64
    index_add ('' if nothing): each row within an ulp of its dtype (plus fp32 rounding) of the exact
    sum, rows of absent ids exactly 0, the same bits twice."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(ids.numel(), hidden, generator=g).to(dtype).to(ids.device)
    ours = embedding_kernels.segment_sums(ids, grad, rows)
    ref = torch.zeros(rows, hidden, dtype=torch.float64).index_add_(0, ids.cpu(), grad.cpu().double())
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}[dtype]
    absent = torch.ones(rows, dtype=torch.bool)
    absent[ids.cpu()] = False
    err = (ours.cpu().double() - ref).abs()
    bound = ref.abs() * ulp + 1e-6 * grad.cpu().double().abs().max() * ids.numel() ** 0.5
    if ours.dtype != dtype or not bool((err <= bound).all()):
        return f"{int((err > bound).sum())} elements off the float64 sums (worst {err.max().item():.2e})"
    if bool(ours.cpu()[absent].any()):
        return "rows of ids that do not occur are not zero"
    if not torch.equal(ours, embedding_kernels.segment_sums(ids, grad, rows)):
        return "a second run gave other bits"
    return ""


def check_embedding_grad() -> None:
    c = embedding_kernels.CHUNK
    g = torch.Generator().manual_seed(20)
    cases = {  # ids [n] -> what they exercise
        "a run over four chunks and cut ones":
            torch.cat([torch.full((4 * c + 5,), 7), torch.randint(0, 50, (3 * c,), generator=g)]),
        "a run over more chunks than the carry pass reads at once":
            torch.cat([torch.full((c * (2 * embedding_kernels.CARRY_AHEAD + 3) + 9,), 4),
                       torch.randint(5, 90, (c,), generator=g)]),
        "runs on chunk boundaries": torch.arange(4 * c) // (c // 2),
        "one id everywhere, a ragged last chunk": torch.full((2 * c + 3,), 3),
        "fewer tokens than a chunk": torch.randint(0, 9, (c // 2 + 1,), generator=g),
        "shuffled, a [MASK]-like frequent id": torch.where(torch.rand(6 * c, generator=g) < 0.3, 5,
                                                           torch.randint(0, 200, (6 * c,), generator=g)),
    }
    for i, (what, ids) in enumerate(cases.items()):
        # (bf16 on the GPU only: the interpreter's dot multiplies bf16 bit patterns as integers)
        for hidden, dtype in ((160, torch.float32), (128, torch.float16)):  # 160: a part-filled column block
            wrong = embedding_grad_errors(ids, 211, hidden, dtype, i)
            if wrong:
                raise SystemExit(f"FAIL embedding grad ({what}, h={hidden}, {dtype}): {wrong}")
    # a table too large for the 16-bit sort keys (ids past 2^15 sorted as int32)
    ids = torch.where(torch.rand(5 * c, generator=g) < 0.2, 39000, torch.randint(30000, 40000, (5 * c,), generator=g))
    wrong = embedding_grad_errors(ids, 40000, 32, torch.float32, 9)
    if wrong:
        raise SystemExit(f"FAIL embedding grad (a 40000-row table): {wrong}")
    print(f"OK interpret embedding grad segment sums: {len(cases)} id patterns x fp32/fp16 and a table past "
          f"16-bit ids within an ulp of float64, absent rows zero, the same bits twice")

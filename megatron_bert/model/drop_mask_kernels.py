"""The attention dropout mask as bits, drawn per drop (Triton, GPU), and the tiles the kernels read.

A Bernoulli(p) drop needs ~0.47 bits of entropy per element, not the 32 of a Philox word per
probability that cuDNN draws. ``drop_bits`` draws, for each query row, the gaps between dropped keys
(``gap = ⌊log U / log(1 − p)⌋``, one 32-bit uniform per *drop*, ~p·s_k per row) into a bit mask,
word-major ``[⌈s_k/32⌉, rows]`` (a warp's rows advance at about the same pace, so its stores land in a
few lines). Each position is then dropped independently with probability ``p`` up to the float32
rounding of ``U`` and the error of the SFU's logarithm (2^-22.6 absolute for U in [0.5, 1], 2 ulp below:
a gap lands on its neighbour in a few of 10^6 draws). ``drop_tile`` / ``drop_tile_t``
expand a tile's words into the [queries, keys] / [keys, queries] drop tiles of attention_kernels.py,
``zero_dropped`` zeroes the dropped elements of an fp32 tile.
On H200 the draw takes ~39 µs for 262k rows of 512 keys (b · heads · s of BERT-345M at seq 512 /
batch 32; 56 µs with tl.log2's software logarithm: bench/NOTES.md, sessions 9, 12 and 15).
"""
from __future__ import annotations

import math

import torch

from ..triton_support import PTX, tl, triton, tuned

if triton is not None:

    @triton.jit
    def fast_log2(x):
        # The SFU's log2 (MUFU.LG2; absolute error <= 2^-22.6 on [0.5, 2], 2 ulp elsewhere). tl.log2
        # compiles to libdevice's accurate polynomial: ~25 more instructions a drop, 56 -> 39 µs a mask.
        if PTX:
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.log2(x)

    @triton.jit
    def _drop_step(rand, pos, word, bits, out, n_rows, inv_log_keep, S_K: tl.constexpr):
        # One geometric gap from one Philox word: the next dropped key of each row.
        # inv_log_keep = 1 / log2(1 - p); U = (r + 1/2) / 2^32 in (0, 1]
        u = rand.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
        # log U / log(1 - p) >= 0; the approximate log2 can come out a hair above 0 for U next to 1
        gap = tl.minimum(tl.maximum(tl.floor(fast_log2(u) * inv_log_keep), 0.0), S_K)
        pos = tl.minimum(pos + 1 + gap.to(tl.int32), S_K)
        new_word = pos >> 5
        moved = new_word != word
        tl.store(out + word.to(tl.int64) * n_rows, bits, mask=moved & (bits != 0))
        bits = tl.where(moved, 0, bits) | tl.where(pos < S_K, 1 << (pos & 31), 0)
        return pos, new_word, bits

    @triton.jit
    def _draw_rows(seed_ptr, bits_ptr, rows, row_ok, n_rows, inv_log_keep, salt, S_K: tl.constexpr,
                   WORDS: tl.constexpr):
        # Row r's dropped keys: pos_0 = G_0, pos_{i+1} = pos_i + 1 + G_{i+1}, G ~ Geometric(p) from
        # one Philox word each (counter: row, draw, salt). Positions rise, so each row builds one
        # 32-bit word at a time and stores it when the next drop lands in a later word. Word-major
        # layout [WORDS, n_rows]: a warp's rows advance at about the same pace, so its stores land in
        # a few lines. Words without drops are never written there: each thread zeroes its row first
        # (no zero-fill kernel before this one).
        seed = tl.load(seed_ptr)
        pos = tl.where(row_ok, -1, S_K)
        zero = tl.zeros(rows.shape, dtype=tl.int32)
        word, bits = zero, zero
        out = bits_ptr + rows
        col = out
        for _ in tl.static_range(WORDS):
            tl.store(col, zero, mask=row_ok)
            col += n_rows
        draw = zero
        while tl.min(pos, axis=0) < S_K:
            r0, r1, r2, r3 = tl.philox(seed, rows.to(tl.int32), draw, zero + salt, zero)
            pos, word, bits = _drop_step(r0, pos, word, bits, out, n_rows, inv_log_keep, S_K)
            pos, word, bits = _drop_step(r1, pos, word, bits, out, n_rows, inv_log_keep, S_K)
            pos, word, bits = _drop_step(r2, pos, word, bits, out, n_rows, inv_log_keep, S_K)
            pos, word, bits = _drop_step(r3, pos, word, bits, out, n_rows, inv_log_keep, S_K)
            draw += 1
        tl.store(out + word.to(tl.int64) * n_rows, bits, mask=(bits != 0) & (word < WORDS))

    @tuned([triton.Config({"ROWS": r}, num_warps=w) for r, w in ((128, 4), (64, 2), (32, 1), (256, 4), (128, 2))],
            key=["n_rows", "S_K"])
    @triton.jit
    def _drop_bits_kernel(seed_ptr, bits_ptr, n_rows, inv_log_keep, salt,
                          S_K: tl.constexpr, WORDS: tl.constexpr, ROWS: tl.constexpr):
        # ROWS rows per program, one or two per thread. A kernel of its own: with the forward at seq
        # 512 / batch 32 on H200 the pair took 183 µs, the same draw in the forward's prologue 205 µs.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        _draw_rows(seed_ptr, bits_ptr, rows, rows < n_rows, n_rows, inv_log_keep, salt, S_K, WORDS)

    @triton.jit
    def drop_tile(bits_ptr, n_rows, rows, start_n, row_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  WORDS: tl.constexpr):
        # [BLOCK_M, BLOCK_N] int32, nonzero where (query row, key start_n + j) is dropped: the tile's
        # BLOCK_N / 32 words per row, expanded in registers (a load per element measured 4x slower).
        wcols = start_n // 32 + tl.arange(0, BLOCK_N // 32)
        w = tl.load(bits_ptr + wcols[None, :].to(tl.int64) * n_rows + rows[:, None],
                    mask=row_ok[:, None] & (wcols[None, :] < WORDS), other=0)
        bit = w[:, :, None] & (1 << tl.arange(0, 32))[None, None, :]  # one LOP3 per element, the bits hoisted
        return tl.reshape(bit, [BLOCK_M, BLOCK_N])

    @triton.jit
    def drop_tile_t(bits_ptr, n_rows, rows, start_n, row_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    WORDS: tl.constexpr):
        # The transpose of drop_tile, [BLOCK_N keys, BLOCK_M queries], built as such (no transposing copy).
        wcols = start_n // 32 + tl.arange(0, BLOCK_N // 32)
        w = tl.load(bits_ptr + wcols[:, None].to(tl.int64) * n_rows + rows[None, :],
                    mask=row_ok[None, :] & (wcols[:, None] < WORDS), other=0)
        bit = w[:, None, :] & (1 << tl.arange(0, 32))[None, :, None]
        return tl.reshape(bit, [BLOCK_N, BLOCK_M])

    @triton.jit
    def zero_dropped(x, drop):
        # fp32 x where drop == 0, else 0, selected in fp32. Written as tl.where followed by a cast to
        # bf16, LLVM moved the select past the cast onto packed bf16 pairs: two PRMTs and an integer
        # SEL per element where an FSEL does (sm90 SASS, bench/NOTES.md session 14).
        if PTX:
            return tl.inline_asm_elementwise(
                "{ .reg .pred d; setp.ne.b32 d, $2, 0; selp.f32 $0, 0f00000000, $1, d; }",
                "=f,f,r", [x, drop], dtype=tl.float32, is_pure=True, pack=1)
        else:  # the interpreter and ROCm: the same select
            return tl.where(drop == 0, x, 0.0)


def mask_words(s_k: int) -> int:
    """Words per row of a mask over s_k keys."""
    return -(-s_k // 32)


def drop_bits(seed: torch.Tensor, rows: int, s_k: int, p: float, salt: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The dropout bit mask ``[⌈s_k/32⌉, rows]`` (int32, word-major; bit j of word w of a row set = key
    32w + j dropped), written into ``out`` if given (its contents do not matter)."""
    if p <= 0.0 or not rows:
        return torch.zeros(mask_words(s_k), rows, dtype=torch.int32, device=seed.device)
    bits = torch.empty(mask_words(s_k), rows, dtype=torch.int32, device=seed.device) if out is None else out
    grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]),)  # noqa: E731
    _drop_bits_kernel[grid](seed, bits, rows, math.log(2.0) / math.log1p(-p), salt, S_K=s_k, WORDS=mask_words(s_k))
    return bits


def keep_from_bits(bits: torch.Tensor, s_k: int) -> torch.Tensor:
    """``[rows, s_k]`` bool (True = kept) from ``drop_bits``'s words."""
    j = torch.arange(s_k, device=bits.device)
    return ((bits.t()[:, j // 32] >> (j % 32)) & 1) == 0

"""The gradient of the structural attention bias table (structure_bias.py) as a Triton kernel.

FlexAttention differentiates a score_mod's captured table by one atomic add per score, all of them into a
table of a few entries per head, which would dominate a structural layer's backward. This kernel instead
recomputes each tile's probabilities and score gradients, as a flash-attention backward does,

    P = exp(q k^T * scale + table[h, bucket] - lse),   dS = P * (dO v^T - delta),   delta = rowsum(dO * O),

and sums dS per bucket in registers: one partial sum per (batch, head, query block), added up by the caller.
Its plain reference is autograd through `masked_attention_reference` with the dense `structure_bias`
(tests/test_structure.py runs this kernel in Triton's interpreter on the CPU against it).
"""

import triton
import triton.language as tl
import torch
from torch import Tensor


@triton.jit
def _bucket_sums(acc, q, k, v, do, lse, delta, valid, bucket_ptrs, table_row, scale, NB: tl.constexpr, NB_POW2: tl.constexpr, PRECISION: tl.constexpr):
    # Under torch.compile, inductor launches this kernel with `scale` as a float64 scalar: back to float32, or
    # the sums below turn float64 and the loops' accumulator changes type.
    s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)
    bucket = tl.load(bucket_ptrs, mask=valid, other=0).to(tl.int32)
    s += tl.load(table_row + bucket)
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    slot = tl.arange(0, NB_POW2)
    for j in tl.static_range(NB):
        acc += tl.where(slot == j, tl.sum(tl.where(bucket == j, ds, 0.0)), 0.0)
    return acc


@triton.jit
def _table_grad_kernel(
    Q, K, V, DO, LSE, DELTA, BUCKETS, DOC, TABLE, PARTIAL,
    T, H, H_KV, WINDOW, STRIDE, N_GLOBAL, COLS, G, scale,
    D: tl.constexpr, D_POW2: tl.constexpr, NB: tl.constexpr, NB_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_POW2)
    in_head = offs_d[None, :] < D
    in_seq = offs_m < T
    q_ptrs = (pid_bh * T + offs_m[:, None]) * D + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=in_seq[:, None] & in_head, other=0.0)
    do = tl.load(DO + q_ptrs, mask=in_seq[:, None] & in_head, other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=in_seq, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=in_seq, other=0.0)
    doc_q = tl.load(DOC + b * T + offs_m, mask=in_seq, other=-1)
    kv_head = (b * H_KV + h // (H // H_KV)) * T * D
    bucket_rows = BUCKETS + b * T * COLS + offs_m[:, None] * COLS
    table_row = TABLE + h * NB
    acc = tl.zeros([NB_POW2], dtype=tl.float32)

    # Keys of the window: q - WINDOW < k <= q, bucket column G + (q - k).
    lo = tl.maximum(pid_m * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_ptrs = kv_head + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=(offs_n[:, None] < T) & in_head, other=0.0)
        v = tl.load(V + kv_ptrs, mask=(offs_n[:, None] < T) & in_head, other=0.0)
        rel = offs_m[:, None] - offs_n[None, :]
        doc_k = tl.load(DOC + b * T + offs_n, mask=offs_n < T, other=-2)
        valid = (rel >= 0) & (rel < WINDOW) & in_seq[:, None] & (doc_q[:, None] == doc_k[None, :])
        acc = _bucket_sums(acc, q, k, v, do, lse, delta, valid, bucket_rows + G + rel, table_row, scale, NB, NB_POW2, PRECISION)

    # Global keys i * STRIDE at least WINDOW before the query, bucket column i.
    if HAS_GLOBAL:
        n_global = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M - WINDOW, 0) // STRIDE + 1, N_GLOBAL)
        for start in range(0, n_global, BLOCK_N):
            idx = start + tl.arange(0, BLOCK_N)
            pos = idx * STRIDE
            kv_ptrs = kv_head + pos[:, None] * D + offs_d[None, :]
            k = tl.load(K + kv_ptrs, mask=(idx[:, None] < N_GLOBAL) & in_head, other=0.0)
            v = tl.load(V + kv_ptrs, mask=(idx[:, None] < N_GLOBAL) & in_head, other=0.0)
            doc_k = tl.load(DOC + b * T + pos, mask=idx < N_GLOBAL, other=-2)
            valid = (idx[None, :] < N_GLOBAL) & (offs_m[:, None] - pos[None, :] >= WINDOW) & in_seq[:, None] & (doc_q[:, None] == doc_k[None, :])
            acc = _bucket_sums(acc, q, k, v, do, lse, delta, valid, bucket_rows + idx[None, :], table_row, scale, NB, NB_POW2, PRECISION)

    tl.store(PARTIAL + (pid_bh * tl.num_programs(0) + pid_m) * NB_POW2 + tl.arange(0, NB_POW2), acc)


def structure_table_grad(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, d_out: Tensor, lse: Tensor, table: Tensor, buckets: Tensor,
    doc_ids: Tensor | None, window: int | None, global_stride: int | None,
) -> Tensor:
    """d loss / d table for attention with the structural bias. q, out, d_out [B, H, T, D]; k, v [B, Hkv, T, D]
    (positions in order, no global-key prefix); lse [B, H, T] natural-log logsumexp of the biased, masked,
    scaled scores; table [H, NB]; buckets [B, T, G + W] from `structure_buckets`; doc_ids [B, T] or None."""
    b, h, t, d = q.shape
    nb = table.shape[1]
    window = window if window is not None else t
    g = buckets.shape[-1] - window
    n_global = -(-t // global_stride) if global_stride is not None else 0
    q, k, v, d_out = (x.contiguous() for x in (q, k, v, d_out))
    delta = (d_out.float() * out.float()).sum(-1).contiguous()
    block_m = block_n = 64
    nb_pow2 = triton.next_power_of_2(nb)
    grid = (triton.cdiv(t, block_m), b * h)
    partial = torch.empty(b * h, grid[0], nb_pow2, device=q.device, dtype=torch.float32)
    doc = doc_ids.int().contiguous() if doc_ids is not None else torch.zeros(b, t, device=q.device, dtype=torch.int32)  # one document
    _table_grad_kernel[grid](
        q, k, v, d_out, lse.float().contiguous(), delta, buckets.contiguous(), doc, table.float().contiguous(), partial,
        t, h, k.shape[1], window, global_stride or 1, n_global, buckets.shape[-1], g, d**-0.5,
        D=d, D_POW2=max(16, triton.next_power_of_2(d)), NB=nb, NB_POW2=nb_pow2, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_GLOBAL=global_stride is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return partial.view(b, h, grid[0], nb_pow2).sum(dim=(0, 2))[:, :nb].to(table.dtype)

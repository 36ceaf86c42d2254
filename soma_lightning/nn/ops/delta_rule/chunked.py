"""The gated delta rule vectorised within chunks of tokens (the WY form), in PyTorch: the training form where
fla's kernels are not available. Layout and recurrence: soma_lightning/nn/ops/delta_rule/__init__.py."""

import torch
import torch.nn.functional as F
from torch import Tensor

from soma_lightning.nn.ops.delta_rule.naive import prepare, start_state

CHUNK_SIZE = 64


def gated_delta_rule_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, resets: Tensor | None = None, scale: float | None = None,
    chunk_size: int = CHUNK_SIZE, initial_state: Tensor | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence in chunks of `chunk_size` tokens: matrix products within a chunk, a loop over chunks.
    -> [B, T, HV, V] in v's dtype; with `output_final_state` also the float32 state after the last token
    [B, HV, K, V]. `initial_state`: as in `gated_delta_rule_recurrent`.

    Within a chunk (positions i, j; S0 the state entering it; G the cumulative sum of g in the chunk),
    with gamma(i, j) = exp(G_i - G_j) for j <= i in one document (else 0) and carry_i = exp(G_i) before
    the chunk's first reset (else 0), the recurrence unrolls to
        A delta = beta * v - (beta * carry * k) S0,   A = I + strictly-lower(beta_i (k_i . k_j) gamma(i, j))
        o = (q * carry) S0 + ((q k^T) * gamma) delta
        S_next = carry_C S0 + (k * gamma(C, .))^T delta
    so delta = u - w S0 with u = A^-1 (beta * v), w = A^-1 (beta * carry * k), both solved for all chunks
    at once; only the products with S0 run chunk after chunk."""
    b, t, dtype = v.shape[0], v.shape[1], v.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, scale)
    if resets is None:
        resets = torch.zeros(b, t, dtype=torch.bool, device=q.device)
    # Padding with zero q, k, v, g and beta leaves the state alone; the padded outputs are cut off.
    pad = -t % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, chunk_size)) for x in (q, k, v))  # [B, HV, N, C, D]
    g, beta = (F.pad(x, (0, pad)).unflatten(2, (-1, chunk_size)) for x in (g, beta))  # [B, HV, N, C]
    segment = F.pad(resets, (0, pad)).unflatten(1, (-1, chunk_size)).cumsum(-1)[:, None]  # resets so far in the chunk

    cum = g.cumsum(-1)  # G
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    linked = causal & (segment[..., :, None] == segment[..., None, :])
    # Mask the exponents, not the exponentials: exp(G_i - G_j) overflows for j > i, and inf * 0 is NaN.
    gamma = (cum[..., :, None] - cum[..., None, :]).masked_fill(~linked, float("-inf")).exp()
    carry = cum.masked_fill(segment > 0, float("-inf")).exp()

    lower = (beta[..., None] * (k @ k.mT) * gamma).tril(-1)  # A - I; unitriangular=True implies the diagonal
    rhs = torch.cat([beta[..., None] * v, (beta * carry)[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    u, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    scores = (q @ k.mT) * gamma
    q_carry = q * carry[..., None]
    k_to_end = k * gamma[..., -1, :, None]

    state = start_state(initial_state, k, v)  # [B, HV, K, V]
    outputs = []
    for n in range(q.shape[2]):
        delta = u[:, :, n] - w[:, :, n] @ state
        outputs.append(q_carry[:, :, n] @ state + scores[:, :, n] @ delta)
        state = carry[:, :, n, -1, None, None] * state + k_to_end[:, :, n].mT @ delta
    o = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :t].transpose(1, 2).to(dtype)
    return (o, state) if output_final_state else o

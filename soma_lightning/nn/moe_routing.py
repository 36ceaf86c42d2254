"""The moe FFN's sequence-level routers, expert choice and soft MoE, in causal forms.

Both originals look at a whole group of tokens at once: in expert choice (Zhou et al. 2022) each expert takes
the `capacity` tokens of the group that score highest for it; in soft MoE (Puigcerver et al. 2023) each
expert slot's input is a softmax-weighted average of all the group's tokens. For next-token training the
group would hold later tokens, which then change earlier outputs. Here each row is cut into chunks of C
positions and chunk c is routed with what chunk c - `delay` saw (delay 1, always used by the layer):

    expert_choice  expert e's threshold for chunk c is the capacity-th largest router probability of e
                   among the tokens of chunk c - 1 (capacity = ceil(C * top_k / num_experts)); a token of
                   chunk c goes to every expert whose probability reaches that threshold, weighted by the
                   probability (so a token may get no expert, or many: top_k on average). Chunk 0, with no
                   chunk before it, takes each token's top_k experts.
    soft           the num_experts * slots_per_expert slots that chunk c combines are the dispatch-weighted
                   averages of the tokens of chunk c - 1 (softmax over those C tokens per slot), run
                   through their experts; token t of chunk c mixes the slot outputs with its own softmax
                   over the slots. Chunk 0 combines nothing: its output is 0.

delay 0 is the original form: a chunk routes by its own tokens, later ones included. It exists for the test
that shows the leak (tests/test_routing.py); no spec reaches it.
"""

import math

import torch
from torch import Tensor

from soma_lightning.nn.context import SequenceContext


def _chunked(x: Tensor, chunk: int, fill: float) -> Tensor:
    """[B, T, ...] -> [B, n, C, ...], the last chunk padded with `fill`."""
    pad = -x.shape[1] % chunk
    if pad:
        x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], dim=1)
    return x.unflatten(1, (-1, chunk))


def _delayed(x: Tensor, delay: int, first: Tensor) -> Tensor:
    """[B, n, ...] per chunk -> what chunk c reads: x of chunk c - delay, `first` (broadcastable) for c < delay."""
    if delay == 0:
        return x
    return torch.cat([first.expand_as(x[:, :delay]), x[:, :-delay]], dim=1)


def expert_choice_selection(probs: Tensor, chunk: int, top_k: int, delay: int = 1) -> Tensor:
    """Router probabilities [B, T, E] -> bool [B, T, E]: which experts take each token (module docstring)."""
    b, t, e = probs.shape
    capacity = min(chunk, math.ceil(chunk * top_k / e))
    p = _chunked(probs, chunk, float("-inf"))  # [B, n, C, E]
    threshold = p.topk(capacity, dim=2).values[:, :, -1:]  # [B, n, 1, E]
    own_top_k = p.topk(top_k, dim=-1).values[..., -1:]  # [B, n, C, 1]: token choice, for the chunks before `delay`
    threshold = _delayed(threshold, delay, torch.full_like(threshold[:, :1], float("nan")))
    threshold = torch.where(threshold.isnan(), own_top_k, threshold)
    return (p >= threshold).flatten(1, 2)[:, :t]


def soft_slots(x: Tensor, logits: Tensor, chunk: int, delay: int = 1) -> tuple[Tensor, Tensor]:
    """Inputs x [B, T, D] and slot logits [B, T, S] -> (slot inputs [B, n, S, D] that each chunk combines,
    combine weights [B, T, S])."""
    xc = _chunked(x, chunk, 0.0)
    dispatch = _chunked(logits, chunk, float("-inf")).softmax(dim=2)  # over the chunk's tokens, per slot
    slots = torch.einsum("bncs,bncd->bnsd", dispatch.to(x.dtype), xc)
    return _delayed(slots, delay, slots.new_zeros(())), logits.softmax(dim=-1)


class InputHistory:
    """Cached decoding's memory of a chunk-routed layer: its inputs [B, T, D] so far (the chunk before the
    newest positions is re-routed from them)."""

    def __init__(self) -> None:
        self.x: Tensor | None = None

    def extend(self, x: Tensor) -> Tensor:
        self.x = x if self.x is None else torch.cat([self.x, x], dim=1)
        return self.x

    def rollback(self, length: int) -> None:
        self.x = self.x[:, :length]


def chunk_routed_forward(moe, x: Tensor, ctx: SequenceContext) -> Tensor:
    """MoE.forward for routing "expert_choice" and "soft". With ctx.decode, the new positions are routed
    together with the inputs from the start of the chunk before them."""
    n, c = x.shape[1], moe.routing_chunk
    if ctx.decode is not None:
        history = ctx.decode.cache(moe, InputHistory).extend(x)
        x = history[:, max(0, ctx.decode.start // c - 1) * c :]
    route = _expert_choice if moe.routing == "expert_choice" else _soft
    return route(moe, x)[:, -n:]


def _expert_choice(moe, x: Tensor) -> Tensor:
    b, t, d = x.shape
    logits = moe.router(x).float()
    probs = logits.softmax(dim=-1)
    chosen = expert_choice_selection(probs, moe.routing_chunk, moe.top_k, moe.routing_delay).flatten(0, 1)  # [N, E]
    flat = x.reshape(b * t, d)
    token, expert = chosen.nonzero(as_tuple=True)
    order = torch.argsort(expert, stable=True)
    token, expert = token[order], expert[order]
    counts = chosen.sum(dim=0)
    dtype = moe.compute_dtype(x)
    y = moe._experts(flat[token].to(dtype), counts)
    gate = probs.flatten(0, 1)[token, expert]
    out = torch.zeros_like(flat).index_add_(0, token, (y * gate[:, None]).to(flat.dtype))
    out = out + moe.shared_experts(flat, dtype)
    moe.aux_loss = moe.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
    moe.stats = {"tokens_per_expert": counts.detach(), "dropped_fraction": 1 - chosen.any(dim=-1).float().mean().detach()}
    return out.view(b, t, d)


def _soft(moe, x: Tensor) -> Tensor:
    b, t, d = x.shape
    e, s = moe.num_experts, moe.slots_per_expert
    logits = moe.router(x).float()  # [B, T, E * S]
    slots, combine = soft_slots(x.float(), logits, moe.routing_chunk, moe.routing_delay)  # [B, n, E*S, D]
    chunks = slots.shape[1]
    dtype = moe.compute_dtype(x)
    rows = slots.view(b, chunks, e, s, d).permute(2, 0, 1, 3, 4).reshape(-1, d)  # sorted by expert
    counts = torch.full((e,), b * chunks * s, dtype=torch.long, device=x.device)
    y = moe._experts(rows.to(dtype), counts).float().view(e, b, chunks, s, d).permute(1, 2, 0, 3, 4).reshape(b, chunks, e * s, d)
    out = torch.einsum("bncs,bnsd->bncd", _chunked(combine, moe.routing_chunk, 0.0), y).flatten(1, 2)[:, :t]
    flat = x.reshape(b * t, d)
    out = out.reshape(b * t, d).to(x.dtype) + moe.shared_experts(flat, dtype)
    moe.aux_loss = logits.new_zeros(())
    moe.stats = {"tokens_per_expert": counts, "dropped_fraction": logits.new_zeros(())}
    return out.view(b, t, d)

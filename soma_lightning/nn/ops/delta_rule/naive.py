"""The gated delta rule one token at a time: the reference of the chunked and fla forms (and incremental
decoding's step, which needs every state). Layout and recurrence: soma_lightning/nn/ops/delta_rule/__init__.py."""

import torch
from torch import Tensor


def l2norm(x: Tensor) -> Tensor:
    """x / |x| along the last dim, as fla's `use_qk_l2norm_in_kernel` computes it."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def prepare(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None) -> list[Tensor]:
    """float32 and [B, HV, T, ...]: q and k normalised and repeated for their value heads, q scaled."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = v.shape[2] // q.shape[2]
    q = (l2norm(q.float()) * scale).repeat_interleave(groups, dim=2)
    k = l2norm(k.float()).repeat_interleave(groups, dim=2)
    return [x.float().transpose(1, 2) for x in (q, k, v, g, beta)]


def start_state(state: Tensor | None, k: Tensor, v: Tensor) -> Tensor:
    """The float32 state [B, HV, K, V] before the first token, zero unless given (prepared k, v)."""
    return k.new_zeros(*v.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state.float()


def gated_delta_rule_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, resets: Tensor | None = None, scale: float | None = None,
    initial_state: Tensor | None = None, output_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence one token at a time. -> [B, T, HV, V] in v's dtype; with `output_states` also the float32
    state after each token [B, T, HV, K, V]. `initial_state` [B, HV, K, V]: the state before the first token
    (default zero), as incremental decoding continues a sequence."""
    dtype = v.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, scale)
    state = start_state(initial_state, k, v)
    outputs, states = [], []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        if resets is not None:
            state = torch.where(resets[:, t, None, None, None], 0.0, state)
        delta = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, :, t]))
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, :, t], delta)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
        if output_states:
            states.append(state)
    o = torch.stack(outputs, dim=1).to(dtype)
    return (o, torch.stack(states, dim=1)) if output_states else o

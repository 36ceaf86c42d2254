"""The gated delta rule (Gated DeltaNet, as in Qwen3-Next and flash-linear-attention) and its short convolution.

Layout as in flash-linear-attention: q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head
j reads q/k head j // (HV // H)); g (log decay, <= 0) and beta (in (0, 1)) [B, T, HV]; resets [B, T] bool,
True where a new document starts. q and k are L2-normalised inside the op, then q is scaled (K**-0.5 by
default). Per batch row and value head, a state S [K, V] starts at zero and for each token t:

    S = exp(g_t) * S            (S = 0 where resets[t]: the limit g_t = -inf)
    delta_t = beta_t * (v_t - S^T k_t)
    S = S + k_t delta_t^T
    o_t = S^T q_t

`gated_delta_rule_recurrent` is that loop (the reference), `gated_delta_rule_chunked` the same function
vectorised within chunks (the WY form), and "fla" the flash-linear-attention Triton kernels (CUDA only).
"""

import functools
import importlib.util
import warnings
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64


def l2norm(x: Tensor) -> Tensor:
    """x / |x| along the last dim, as fla's `use_qk_l2norm_in_kernel` computes it."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def _prepare(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None) -> list[Tensor]:
    """float32 and [B, HV, T, ...]: q and k normalised and repeated for their value heads, q scaled."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = v.shape[2] // q.shape[2]
    q = (l2norm(q.float()) * scale).repeat_interleave(groups, dim=2)
    k = l2norm(k.float()).repeat_interleave(groups, dim=2)
    return [x.float().transpose(1, 2) for x in (q, k, v, g, beta)]


def gated_delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    resets: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time. -> [B, T, HV, V] in v's dtype; with `output_states`
    also the float32 state after each token [B, T, HV, K, V]. `initial_state` [B, HV, K, V]: the state
    before the first token (default zero), as incremental decoding continues a sequence."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale)
    state = q.new_zeros(*v.shape[:2], k.shape[-1], v.shape[-1]) if initial_state is None else initial_state.float()  # [B, HV, K, V]
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


def gated_delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    resets: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = CHUNK_SIZE,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
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
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale)
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

    state = q.new_zeros(*v.shape[:2], k.shape[-1], v.shape[-1]) if initial_state is None else initial_state.float()  # [B, HV, K, V]
    outputs = []
    for n in range(q.shape[2]):
        delta = u[:, :, n] - w[:, :, n] @ state
        outputs.append(q_carry[:, :, n] @ state + scores[:, :, n] @ delta)
        state = carry[:, :, n, -1, None, None] * state + k_to_end[:, :, n].mT @ delta
    o = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :t].transpose(1, 2).to(dtype)
    return (o, state) if output_final_state else o


@functools.cache
def _fla_importable() -> bool:
    try:
        import fla.modules.causal_conv1d  # noqa: F401
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def fla_backward_blocked() -> str | None:
    """Why fla's gated delta rule backward refuses to run here, or None. fla 0.6 raises a RuntimeError in
    that backward on Hopper with Triton 3.4 to 3.7.0 (wrong gradients, its issue #640) unless tilelang is
    installed to provide the kernel."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    if IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1 and importlib.util.find_spec("tilelang") is None:
        import triton

        return f"fla's Gated DeltaNet backward refuses Triton {triton.__version__} on Hopper without tilelang (pip install tilelang)"
    return None


def _use_fla(impl: str, x: Tensor) -> bool:
    return impl == "fla" or (impl == "auto" and x.is_cuda and _fla_importable())


def _use_fla_delta_rule(impl: str, q: Tensor) -> bool:
    """`_use_fla`, except that "auto" runs the chunked PyTorch form (slower, with a warning) where fla's
    backward is blocked and a gradient is needed."""
    use = _use_fla(impl, q)
    if not use or impl == "fla" or not torch.is_grad_enabled():
        return use
    blocked = fla_backward_blocked()
    if blocked:
        warnings.warn(f"{blocked}; training runs the delta rule in PyTorch (chunked), which is slower", stacklevel=3)
    return blocked is None


def sequence_bounds(resets: Tensor) -> Tensor:
    """[B, T] resets -> fla's `cu_seqlens` for the batch flattened to one row: every row start and every
    reset, then B*T. Reading the bounds back synchronises with the host, so a caller that runs several fla
    ops over the same documents computes them once and passes them on (fla also caches what it derives
    from them by tensor identity)."""
    b, t = resets.shape
    starts = resets.clone()
    starts[:, 0] = True
    bounds = starts.flatten().nonzero().flatten()
    return torch.cat([bounds, bounds.new_tensor([b * t])])


def _fla_call(
    fn: Callable[..., tuple[Tensor, Tensor | None]], tensors: list[Tensor], resets: Tensor | None, cu_seqlens: Tensor | None, **kwargs
) -> Tensor:
    """Run an fla op on [B, T, ...] tensors. With resets, every document becomes one of fla's variable-length
    sequences (`sequence_bounds`, unless given as cu_seqlens)."""
    if resets is None:
        return fn(*tensors, **kwargs)[0]
    b, t = resets.shape
    cu_seqlens = sequence_bounds(resets) if cu_seqlens is None else cu_seqlens
    out = fn(*(x.flatten(0, 1).unsqueeze(0) for x in tensors), cu_seqlens=cu_seqlens, **kwargs)[0]
    return out.view(b, t, *out.shape[2:])


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    resets: Tensor | None = None,
    scale: float | None = None,
    impl: Literal["auto", "recurrent", "chunked", "fla"] = "auto",
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """The gated delta rule -> [B, T, HV, V]. impl "auto": fla's chunked kernel on CUDA when fla imports
    (and its backward can run: `fla_backward_blocked`), the chunked PyTorch form otherwise. cu_seqlens:
    `sequence_bounds(resets)` if the caller has it."""
    if _use_fla_delta_rule(impl, q):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return _fla_call(chunk_gated_delta_rule, [q, k, v, g, beta], resets, cu_seqlens, scale=scale, use_qk_l2norm_in_kernel=True)
    if impl == "recurrent":
        return gated_delta_rule_recurrent(q, k, v, g, beta, resets, scale)
    return gated_delta_rule_chunked(q, k, v, g, beta, resets, scale)


def short_conv(
    x: Tensor, weight: Tensor, resets: Tensor | None = None, impl: Literal["auto", "torch", "fla"] = "auto", cu_seqlens: Tensor | None = None
) -> Tensor:
    """Causal depthwise convolution, then SiLU: x [B, T, C], weight [C, W] -> [B, T, C]. weight[:, -1]
    multiplies the current token, weight[:, -1 - s] the token s back; tokens before the start or of an
    earlier document count as zero. impl "auto": fla's kernel on CUDA when fla imports (cu_seqlens as for
    `gated_delta_rule`)."""
    if _use_fla(impl, x):
        from fla.modules.causal_conv1d import causal_conv1d

        return _fla_call(causal_conv1d, [x], resets, cu_seqlens, weight=weight, activation="silu")
    t = x.shape[1]
    position = torch.arange(t, device=x.device)
    start = torch.where(resets, position, 0).cummax(dim=1).values if resets is not None else 0
    seen = position - start  # earlier tokens of the same document
    out = x * weight[:, -1]
    for s in range(1, weight.shape[1]):
        back = F.pad(x, (0, 0, s, 0))[:, :t]  # x[t - s]
        out = out + back * (seen >= s)[..., None] * weight[:, -1 - s]
    return F.silu(out).to(x.dtype)

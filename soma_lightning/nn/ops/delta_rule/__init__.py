"""The gated delta rule (Gated DeltaNet, as in Qwen3-Next and flash-linear-attention) and its short
convolution: which form runs where. The forms themselves:

    naive.py    `gated_delta_rule_recurrent`, the recurrence one token at a time (the reference)
    chunked.py  `gated_delta_rule_chunked`, the same function vectorised within chunks (the WY form)
    fla.py      flash-linear-attention's Triton kernels (CUDA only)
    conv.py     the short convolution in PyTorch (fla's `causal_conv1d` beside it in fla.py)

Layout as in flash-linear-attention: q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head
j reads q/k head j // (HV // H)); g (log decay, <= 0) and beta (in (0, 1)) [B, T, HV]; resets [B, T] bool,
True where a new document starts. q and k are L2-normalised inside the op, then q is scaled (K**-0.5 by
default). Per batch row and value head, a state S [K, V] starts at zero and for each token t:

    S = exp(g_t) * S            (S = 0 where resets[t]: the limit g_t = -inf)
    delta_t = beta_t * (v_t - S^T k_t)
    S = S + k_t delta_t^T
    o_t = S^T q_t
"""

import functools
import importlib.util
import warnings
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import Tensor

from soma_lightning.nn.ops.delta_rule.chunked import CHUNK_SIZE, gated_delta_rule_chunked
from soma_lightning.nn.ops.delta_rule.conv import short_conv_torch
from soma_lightning.nn.ops.delta_rule.fla import fla_gated_delta_rule, fla_short_conv, sequence_bounds
from soma_lightning.nn.ops.delta_rule.naive import gated_delta_rule_recurrent

T = TypeVar("T")

__all__ = ["CHUNK_SIZE", "fla_backward_blocked", "gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_recurrent", "sequence_bounds", "short_conv"]


def _cached_constant(fn: Callable[[], T]) -> Callable[[], T]:
    """fn computed once; torch.compile takes its value as a constant instead of tracing it (dynamo traces
    through a functools.cache wrapper with a warning on every compile)."""
    cached = functools.cache(fn)

    @functools.wraps(fn)
    def value() -> T:
        return cached()

    return torch.compiler.assume_constant_result(value)


@_cached_constant
def _fla_importable() -> bool:
    try:
        import fla.modules.causal_conv1d  # noqa: F401
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError:
        return False
    return True


@_cached_constant
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


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, resets: Tensor | None = None, scale: float | None = None,
    impl: Literal["auto", "recurrent", "chunked", "fla"] = "auto", cu_seqlens: Tensor | None = None,
) -> Tensor:
    """The gated delta rule -> [B, T, HV, V]. impl "auto": fla's chunked kernel on CUDA when fla imports
    (and its backward can run: `fla_backward_blocked`), the chunked PyTorch form otherwise. cu_seqlens:
    `sequence_bounds(resets)` if the caller has it."""
    if _use_fla_delta_rule(impl, q):
        return fla_gated_delta_rule(q, k, v, g, beta, resets, scale, cu_seqlens)
    if impl == "recurrent":
        return gated_delta_rule_recurrent(q, k, v, g, beta, resets, scale)
    return gated_delta_rule_chunked(q, k, v, g, beta, resets, scale)


def short_conv(
    x: Tensor, weight: Tensor, resets: Tensor | None = None, impl: Literal["auto", "torch", "fla"] = "auto", cu_seqlens: Tensor | None = None
) -> Tensor:
    """Causal depthwise convolution, then SiLU (`short_conv_torch`). impl "auto": fla's kernel on CUDA when
    fla imports (cu_seqlens as for `gated_delta_rule`)."""
    if _use_fla(impl, x):
        return fla_short_conv(x, weight, resets, cu_seqlens)
    return short_conv_torch(x, weight, resets)

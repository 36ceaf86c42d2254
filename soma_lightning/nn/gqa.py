"""Grouped-query causal attention with RoPE, optional QK-norm, the long-context local + global pattern and
the structural bias.

Which keys a query sees: ops/attention/masks.py. How the attention is computed (FlexAttention, SDPA or the
float32 reference): ops/attention/backends.py, picked once by `impl`. The structural bias:
ops/attention/structure_bias.py.
"""

from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import cached_attention, causal_mask
from soma_lightning.nn.differential import Differential, cached_differential
from soma_lightning.nn.ops.attention.backends import BACKENDS
from soma_lightning.nn.ops.attention.differential import rope_halves
from soma_lightning.nn.ops.attention.masks import visible
from soma_lightning.nn.ops.attention.structure_bias import structure_bias
from soma_lightning.nn.protocols import ComponentArgumentError, linear_flops
from soma_lightning.nn.rope import apply_rope
from soma_lightning.nn.tensor_parallel import ParameterPlacements, SharedHeadsParallel, local


class GroupedQueryAttention(nn.Module):
    """num_heads query heads share num_kv_heads key/value heads (num_heads % num_kv_heads == 0). A query sees
    the `window` most recent keys (all earlier keys without one), every global_stride-th key beyond them, and
    only keys of its own document. `structure_buckets`: add a learned per-head bias indexed by the tree
    distance between query and key (from the batch's `structure`, see data_modules/structure.py), distances
    from structure_buckets - 1 on sharing the last bucket. `impl`: "auto" (FlexAttention on CUDA where the
    pattern needs a mask, no dropout applies and heads have at least 16 dims, SDPA otherwise), "sdpa", "flex"
    (refuses dropout > 0) or "reference". `differential`: differential attention (nn/differential.py), two
    softmax maps per head under the same pattern and bias, the second weighted by a learned lambda starting near
    `lambda_init`."""

    default_name = "attention"

    def __init__(
        self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, qk_norm: bool = False,
        bias: bool = False, rope_base: float = 10000.0, window: int | None = None, global_stride: int | None = None,
        structure_buckets: int | None = None, dropout: float = 0.0, impl: Literal["auto", "sdpa", "flex", "reference"] = "auto",
        differential: bool = False, lambda_init: float = 0.8,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if structure_buckets is not None and not 2 <= structure_buckets <= 256:
            raise ComponentArgumentError("structure_buckets", f"need 2 to 256 buckets (stored as bytes) or null, got {structure_buckets}")
        if num_heads <= 0 or num_heads % num_kv_heads:
            raise ComponentArgumentError("num_kv_heads", f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        head_dim = head_dim or d_model // num_heads
        if head_dim % 2 or head_dim <= 0:
            raise ComponentArgumentError("head_dim", f"must be positive and even for RoPE, got {head_dim}")
        for name, value in (("window", window), ("global_stride", global_stride)):
            if value is not None and value <= 0:
                raise ComponentArgumentError(name, f"must be positive or null, got {value}")
        if global_stride is not None and window is None:
            raise ComponentArgumentError("global_stride", "global keys only make sense with a window")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base, self.window, self.global_stride, self.dropout = rope_base, window, global_stride, dropout
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.structure_bias = nn.Parameter(torch.zeros(num_heads, structure_buckets)) if structure_buckets else None
        self.differential = Differential(head_dim, lambda_init) if differential else None
        self.rope_dim = head_dim // 2 if differential else head_dim
        self.impl = impl

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        """Pick the backend (also after construction: bench/generate.py switches loaded models to SDPA)."""
        if impl not in BACKENDS:
            raise ComponentArgumentError("impl", f"expected one of {', '.join(BACKENDS)}, got {impl!r}")
        backend = BACKENDS[impl](self.window, self.global_stride, self.rope_dim)
        if self.dropout > 0 and not backend.supports_dropout:
            raise ComponentArgumentError(
                "dropout", f"impl {impl!r} has no attention dropout, got {self.dropout}; use impl 'auto' or 'sdpa', or dropout 0"
            )
        self._impl, self.backend = impl, backend

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope(self.rope_dim, self.rope_base)
        rope = apply_rope if self.differential is None else rope_halves
        q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
        y = self._attend(q, k, v, ctx) if ctx.decode is None else self._attend_cached(q, k, v, ctx)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: SequenceContext) -> Tensor:
        self._require_structure(ctx)
        table, dropout_p = local(self.structure_bias), self.dropout if self.training else 0.0
        if self.differential is None:
            return self.backend(q, k, v, ctx, table, dropout_p)
        if self.impl == "reference":
            groups = q.shape[1] // k.shape[1]
            bias = structure_bias(table, ctx.structure) if table is not None else None
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return self.differential.reference(q, k, v, self.backend.dense_mask(q, ctx), bias, dropout_p)
        return self.differential(lambda qh, kh: self.backend(qh, kh, v, ctx, table, dropout_p), q, k)

    def _require_structure(self, ctx: SequenceContext) -> None:
        if self.structure_bias is not None and ctx.structure is None:
            raise ValueError("structure_buckets is set, but the batch carries no `structure` (data.init_args.structure: true)")

    def prepare_context(self, ctx: SequenceContext) -> None:
        ctx.rope(self.rope_dim, self.rope_base)
        if ctx.decode is None:
            self._require_structure(ctx)
            self.backend.prepare(ctx, local(self.structure_bias), self.dropout if self.training else 0.0)

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, ctx: SequenceContext) -> Tensor:
        """The new positions' queries against the cached keys (the KV heads only), under the same pattern
        and structural bias as `_attend` (one document: generation never packs several). The pattern is
        evaluated at the positions, so it also masks a static cache's not yet written tail."""
        state = ctx.decode
        k, v = state.kv_cache(self).extend(k, v)
        n, t = q.shape[2], k.shape[2]
        if self.window is None:
            mask = causal_mask(state, ctx.positions, t)
        else:
            mask = visible(ctx.positions[0, :, None], torch.arange(t, device=q.device), self.window, self.global_stride)
        bias = None
        if self.structure_bias is not None:
            if state.structure is None:
                raise ValueError("structure_buckets is set, but decoding was given no `structure` rows")
            bias = structure_bias(self.structure_bias, state.structure[:, t - n :], state.structure)
        if self.differential is not None:
            return cached_differential(state, self, self.differential, q, k, v, mask, bias)
        return cached_attention(state, self, q, k, v, mask, bias)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections plus QK^T and AV over the keys a query sees on average (window and global keys
        counted for a full window without document breaks)."""
        t, w, s = seq_len, self.window, self.global_stride
        keys = (t + 1) / 2
        if w is not None:
            local = w * (w + 1) // 2 + (t - w) * w if t > w else t * (t + 1) // 2
            far = 0
            if s is not None and t > w:  # query q >= w also sees keys 0, s, 2s, ... <= q - w
                m = t - w
                full, rest = divmod(m, s)
                far = m + s * full * (full - 1) // 2 + full * rest
            keys = (local + far) / t
        projections = sum(linear_flops(p) for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        maps = 1 if self.differential is None else 2  # QK^T costs the same over two half-width maps; AV twice
        return projections + (2 + 2 * maps) * self.num_heads * self.head_dim * keys

    def reads_structure(self) -> bool:
        return self.structure_bias is not None

    def supports_static_decode(self) -> bool:
        """Not with the structural bias: its decoding reads the structure rows, which grow with the length."""
        return self.structure_bias is None

    def tensor_parallel_plan(self, tp: int) -> dict[str, ParallelStyle]:
        """Heads split over the ranks (query heads with their key/value heads): q, k, v column-wise, o row-wise,
        the QK-norms over head-split activations, the structural bias by head. With fewer key/value heads than
        ranks, each rank computes the one its query heads read (k and v whole on every rank)."""
        if self.num_heads % tp:
            raise ComponentArgumentError("num_heads", f"{self.num_heads} heads do not split over tp={tp} tensor-parallel ranks")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ComponentArgumentError("num_kv_heads", f"{self.num_kv_heads} heads neither split over nor divide tp={tp} tensor-parallel ranks")
        kv = ColwiseParallel() if self.num_kv_heads % tp == 0 else SharedHeadsParallel(self.num_kv_heads)
        plan: dict[str, ParallelStyle] = {"q_proj": ColwiseParallel(), "k_proj": kv, "v_proj": kv, "o_proj": RowwiseParallel()}
        if self.q_norm is not None:
            plan |= {"q_norm": SequenceParallel(sequence_dim=2, use_local_output=True), "k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)}
        if self.structure_bias is not None:
            plan[""] = ParameterPlacements(structure_bias=Shard(0))
        return plan

"""DePass-style additive decomposition of a model's prediction: how much each source, or each route, adds to
the centred logit of a target token.

The decomposed quantity at position t with target y is the centred logit l_y - mean_v l_v (softmax does
not see a shift of all logits). A forward pass of the model gives the full residual stream; alongside it the
stream is carried as components x = sum_s x_s, one per label s, through every layer with these frozen at
their values in the full pass:
    norms          the scale 1 / sigma (LayerNorm: also the mean is subtracted per component); the shift
                   beta goes to the label "bias"
    attention      the attention weights the layer applied (queries and keys read the full stream; with
                   differential attention A1 - lambda A2 and the per-head RMS scale); values are linear
    activations    GELU's factor gelu(h) / h of the full pre-activation h: component h_s gets
                   h_s * gelu(h) / h (0.5 h_s where h = 0), so the components still sum to gelu(h)
    affine maps    (Linear, low-rank) their value at 0 goes to the label "bias"
so every step is linear in the components and they sum to the full stream, and the contributions sum to
the centred logit (up to rounding). Two labelings:
    sources   where a component entered: each of the 16 MU blocks (its dims of the MU state, after the
              block attention, through the embedding's projection), "temporal", and "bias"
    routes    the last attention hop it took: "embedding" until a graph-attention layer reads it, then
              "layer L EDGE_TYPE" of the last such layer's slot it came through; "bias" for shifts added
              after the embedding
The attention weights come from the model's own cached-decoding pass over the whole sequence with
`record_attention` (one pass, which equals the plain forward; tests/test_generate.py), so every option of
graph_attention (graph RoPE, landmark bias, learned edge gate, differential) is in them as the layer computed
it. Supported: the semantic-state embedding or a token table, layernorm / rmsnorm, graph_attention and
gelu_mlp; any other component is refused by name.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.errors import UserError
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.ffn import GeluMLP
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.protocols import prepare_context
from soma_lightning.nn.semantic_graph import EDGE_TYPES, MU_BLOCKS
from soma_lightning.nn.semantic_state import MU_DIM, SemanticStateEmbedding

Labeling = Literal["sources", "routes"]


@dataclass
class Decomposition:
    """contributions [S, B, T] to the centred target logits [B, T], one row per label."""

    labels: list[str]
    contributions: Tensor
    logits: Tensor

    def totals(self, group: dict[str, str] | None = None) -> dict[str, Tensor]:
        """Contributions [B, T] summed per label, or per group name of `group` (label -> group)."""
        out: dict[str, Tensor] = {}
        for label, c in zip(self.labels, self.contributions):
            key = label if group is None else group.get(label, label)
            out[key] = out[key] + c if key in out else c
        return out


def route_label(layer: int, edge_type: str) -> str:
    return f"layer {layer} {edge_type}"


class _Components:
    """The stream's components [S, B, T, D] with the label index of "bias"."""

    def __init__(self, labels: list[str], parts: Tensor) -> None:
        self.labels, self.parts = labels, parts
        self.bias = labels.index("bias")

    def add_bias(self, parts: Tensor, shift: Tensor | None) -> Tensor:
        if shift is not None:
            parts = parts.clone()
            parts[self.bias] = parts[self.bias] + shift
        return parts

    def affine(self, parts: Tensor, layer: nn.Module) -> Tensor:
        """An affine map (nn.Linear, a low-rank factorisation) on the components: its value at 0 to "bias"."""
        zero = layer(parts.new_zeros(parts.shape[-1]))
        return self.add_bias(layer(parts) - zero, zero)

    def norm(self, parts: Tensor, x: Tensor, norm: nn.Module) -> Tensor:
        """`norm` of the full stream x, with its scale frozen, applied to the components."""
        if isinstance(norm, nn.LayerNorm):
            sigma = torch.sqrt(x.var(dim=-1, correction=0, keepdim=True) + norm.eps)
            scaled = (parts - parts.mean(dim=-1, keepdim=True)) / sigma
            return self.add_bias(scaled * norm.weight if norm.weight is not None else scaled, norm.bias)
        if isinstance(norm, nn.RMSNorm):
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            scaled = parts * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
            return scaled * norm.weight if norm.weight is not None else scaled
        raise UserError(f"attribution: cannot decompose through the norm {type(norm).__name__} (layernorm or rmsnorm)")


def _embedding(model: SomaModel, tokens: Tensor, ctx, labeling: Labeling) -> tuple[Tensor, _Components]:
    embedding = model.embedding
    if isinstance(embedding, nn.Embedding):
        x = embedding(tokens)
        labels = ["token", "bias"] if labeling == "sources" else ["embedding", "bias"]
        return x, _Components(labels, torch.stack([x, torch.zeros_like(x)]))
    if not isinstance(embedding, SemanticStateEmbedding):
        raise UserError(f"attribution: cannot decompose the token embedding {type(embedding).__name__}")
    x = embedding(tokens, ctx)  # also builds ctx.semantic_graph
    _, mu = embedding.embed(tokens)
    inputs = torch.cat([mu, embedding.temporal(tokens)], dim=-1)
    if labeling == "sources":
        labels = [*MU_BLOCKS, "temporal", "bias"]
        width = MU_DIM // len(MU_BLOCKS)
        spans = [(i * width, (i + 1) * width) for i in range(len(MU_BLOCKS))] + [(MU_DIM, inputs.shape[-1])]
    else:
        labels, spans = ["embedding", "bias"], [(0, inputs.shape[-1])]
    weight = embedding.proj.weight
    parts = [inputs[..., a:b] @ weight[:, a:b].T for a, b in spans]
    comps = _Components(labels, torch.stack([*parts, torch.zeros_like(parts[0])]))
    pre = comps.add_bias(comps.parts, embedding.proj.bias)
    if labeling == "routes":  # the embedding's own shifts stay with it
        pre = torch.stack([pre.sum(0), torch.zeros_like(pre[0])])
    comps.parts = comps.norm(pre, pre.sum(0), embedding.norm)
    if labeling == "routes":
        comps.parts = torch.stack([comps.parts.sum(0), torch.zeros_like(comps.parts[0])])
    return x, comps


def _graph_attention(attention: GraphAttention, parts: Tensor, ctx: SequenceContext, comps: _Components, layer: int, labeling: Labeling) -> Tensor:
    """The layer's output on the components, from the weights [B, H, T, T] its forward recorded."""
    weights = ctx.decode.attention[attention].float()
    b, h, t, _ = weights.shape
    values = comps.affine(parts, attention.v_proj).unflatten(-1, (h, -1)).transpose(2, 3)  # [S, B, H, T, hd]
    if labeling == "sources":
        y = weights @ values  # [S, B, H, T, hd]
    else:
        graph = ctx.semantic_graph
        columns = graph.neighbors.masked_fill(graph.neighbors < 0, t)
        kinds = torch.full((b, t, t + 1), -1, dtype=torch.long, device=parts.device).scatter_(2, columns, graph.edge_type)[..., :t]
        full = values.sum(0)
        y = parts.new_zeros(parts.shape[0], *full.shape)
        for code, name in enumerate(EDGE_TYPES):
            y[comps.labels.index(route_label(layer, name))] = (weights * (kinds == code)[:, None]) @ full
    if attention.differential is not None:  # RMSNorm per head, its scale frozen at the full output's
        norm = attention.differential.norm
        full = y.sum(0)
        y = y * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight * (1 - attention.differential.lambda_init)
    return comps.affine(y.transpose(2, 3).flatten(-2), attention.o_proj)


def _gelu_mlp(mlp: GeluMLP, n: Tensor, parts: Tensor, comps: _Components) -> Tensor:
    h = mlp.linear_inner(n)
    ratio = torch.where(h == 0, 0.5, F.gelu(h) / torch.where(h == 0, 1.0, h))
    return comps.affine(comps.affine(parts, mlp.linear_inner) * ratio, mlp.linear_outer)


@torch.no_grad()
def decompose(model: SomaModel, tokens: Tensor, targets: Tensor, labeling: Labeling = "sources") -> Decomposition:
    """The centred logits of `targets` [B, T] (the token predicted at each position) after `tokens` [B, T] (at
    positions 0..T-1, one document), decomposed by `labeling` (module docstring). The model must be in eval
    mode (no dropout)."""
    if model.training:
        raise ValueError("decompose: put the model in eval mode first (dropout would break the sum)")
    state = DecodeState(record_attention=True)
    ctx = SequenceContext(positions=state.append(tokens, None), decode=state)
    x, comps = _embedding(model, tokens, ctx, labeling)
    if labeling == "routes":
        graph_layers = [i for i, block in enumerate(model.encoder.layers) if any(isinstance(m, GraphAttention) for m in block.children())]
        names = [route_label(i, name) for i in graph_layers for name in EDGE_TYPES]
        comps.labels = [comps.labels[0], *names, "bias"]
        comps.bias = len(comps.labels) - 1
        comps.parts = torch.cat([comps.parts[:1], comps.parts.new_zeros(len(names), *x.shape), comps.parts[1:]])
    prepare_context(model.encoder, ctx)
    for i, block in enumerate(model.encoder.layers):
        for norm_name, name in block.order:
            module = block.get_submodule(name)
            if name in block.mtp_sublayers:
                continue
            if norm_name is None:
                raise UserError(f"attribution: encoder.layers.{i}.{name} has no norm; only pre-norm sublayers are decomposed")
            norm = block.get_submodule(norm_name)
            if not isinstance(module, (GraphAttention, GeluMLP)):
                raise UserError(
                    f"attribution: cannot decompose encoder.layers.{i}.{name} ({type(module).__name__}); "
                    "supported: graph_attention, gelu_mlp, layernorm, rmsnorm"
                )
            n, parts = norm(x), comps.norm(comps.parts, x, norm)
            out = module(n, ctx)  # graph attention records its weights in ctx.decode
            if isinstance(module, GraphAttention):
                comps.parts = comps.parts + _graph_attention(module, parts, ctx, comps, i, labeling)
            else:
                comps.parts = comps.parts + _gelu_mlp(module, n, parts, comps)
            x = x + out
    final = comps.norm(comps.parts, x, model.final_norm)  # [S, B, T, D]
    weight = model.predictor.weight
    centred = weight[targets] - weight.mean(dim=0)  # [B, T, D]
    contributions = (final * centred).sum(-1)
    if model.predictor.bias is not None:
        shift = model.predictor.bias[targets] - model.predictor.bias.mean()
        contributions[comps.bias] += shift
    logits = model.predict(model.final_norm(x))  # the model's own forward, as encode computes it
    centred_logits = logits.gather(-1, targets[..., None])[..., 0] - logits.mean(dim=-1)
    return Decomposition(comps.labels, contributions, centred_logits)


def edge_type_of(label: str) -> str:
    """The edge type of a route label ("layer 2 semantic" -> "semantic"); the label itself otherwise."""
    return label.rsplit(" ", 1)[1] if label.startswith("layer ") else label


@torch.no_grad()
def next_token_attribution(model: SomaModel, tokens: Tensor) -> list[dict]:
    """For each position of one sequence tokens [1, T]: the next token as target (the model's own choice at
    the last position), its centred logit, and the contributions by source, by route and by edge type
    (routes summed over layers). The model must be in eval mode."""
    predicted = model(tokens).argmax(-1)
    targets = torch.cat([tokens[:, 1:], predicted[:, -1:]], dim=1)
    sources, routes = (decompose(model, tokens, targets, labeling) for labeling in ("sources", "routes"))
    edge_types = routes.totals({label: edge_type_of(label) for label in routes.labels})
    out = []
    for t in range(tokens.shape[1]):
        out.append({
            "target": int(targets[0, t]), "logit": round(float(sources.logits[0, t]), 5),
            "sources": {label: round(float(c[0, t]), 5) for label, c in zip(sources.labels, sources.contributions)},
            "routes": {label: round(float(c[0, t]), 5) for label, c in zip(routes.labels, routes.contributions)},
            "edge_types": {label: round(float(c[0, t]), 5) for label, c in edge_types.items()},
        })
    return out

"""The one model skeleton every architecture shares: embedding -> encoder.layers -> final_norm -> predictor.

The module names are SOMA V1's canonical names, so a V1 state dict maps 1:1 onto the reference's.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.mtp import MTPPrediction, SequentialMTP
from soma_lightning.nn.protocols import lookback, mtp_horizons, prepare_context


@dataclass
class Sublayer:
    """One residual branch of a block: x + drop(module(norm(x))). MTP components are the exception: they
    read norm(x), add their predictions to the block's, and leave x as it is."""

    name: str  # attribute name of the module inside its block
    module: nn.Module
    norm: nn.Module | None = None


class Block(nn.Module):
    """Residual sublayers run in order; the norm of the k-th sublayer (1-based) is named `norm_k`. Returns the
    stream and the predictions of its MTP heads (none unless `ctx.mtp` is a list). The predictions are returned,
    not put in the context, because FSDP2 unshards a block's parameters for backward when the gradient of one
    of its outputs arrives: a head whose prediction left the block any other way would run its backward on
    freed parameters."""

    def __init__(self, sublayers: list[Sublayer], dropout: float = 0.0) -> None:
        super().__init__()
        self.order: list[tuple[str | None, str]] = []
        self.mtp_sublayers = {sub.name for sub in sublayers if mtp_horizons(sub.module)}
        for k, sub in enumerate(sublayers, start=1):
            norm_name = None
            if sub.norm is not None:
                norm_name = f"norm_{k}"
                self.add_module(norm_name, sub.norm)
            self.add_module(sub.name, sub.module)
            self.order.append((norm_name, sub.name))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: SequenceContext) -> tuple[Tensor, list[MTPPrediction]]:
        predictions = []
        for norm_name, name in self.order:
            module = self.get_submodule(name)
            norm = (lambda h: h) if norm_name is None else self.get_submodule(norm_name)
            if name in self.mtp_sublayers:
                if ctx.mtp is not None:
                    predictions.extend(module(norm(x), ctx))
                continue
            x = x + self.drop(module(norm(x), ctx))
        return x, predictions


class Encoder(nn.Module):
    """The blocks in order, after their modules have built the values of the context that the layers share
    (`prepare_context`). `activation_checkpointing`: keep only each block's input for backward and recompute
    the block there (less memory, about one more forward of compute)."""

    def __init__(self, layers: list[Block]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activation_checkpointing = False

    def forward(self, x: Tensor, ctx: SequenceContext) -> Tensor:
        """The stream after the last block. The blocks' MTP predictions are added to `ctx.mtp` after the last
        block: FSDP2 hands a block a rebuilt copy of any input that holds tensors needing gradients, so a
        context holding predictions would be copied for every later block."""
        prepare_context(self, ctx)
        predictions = []
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, block_predictions = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x, block_predictions = layer(x, ctx)
            predictions.extend(block_predictions)
        if ctx.mtp is not None:
            ctx.mtp.extend(predictions)
        return x


@torch.no_grad()
def normal_init(model: nn.Module, std: float) -> None:
    """Every Linear and Embedding weight ~ N(0, std), their biases zero; other parameters unchanged."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class SomaModel(nn.Module):
    """`input_embeddings` are modules mapping token ids [B, T] to [B, T, D], added to the token embedding;
    `mtp`: DeepSeek-V3-style multi-token-prediction modules after the last layer (training only);
    `token_embedding`: a module called as `(tokens, ctx) -> [B, T, D]` in place of the plain token table
    (SOSM's semantic state, which also builds the graph its attention reads from the context)."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        layers: list[Block],
        final_norm: nn.Module,
        predictor_bias: bool = True,
        input_embeddings: list[nn.Module] = (),
        mtp: SequentialMTP | None = None,
        token_embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model) if token_embedding is None else token_embedding
        self.input_embeddings = nn.ModuleList(input_embeddings)
        self.encoder = Encoder(layers)
        self.final_norm = final_norm
        self.predictor = nn.Linear(d_model, vocab_size, bias=predictor_bias)
        self.mtp = mtp

    def _context(self, tokens: Tensor, positions: Tensor | None, doc_ids: Tensor | None, structure: Tensor | None) -> SequenceContext:
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return SequenceContext(positions=positions, doc_ids=doc_ids, structure=structure)

    def _hidden(self, tokens: Tensor, ctx: SequenceContext) -> Tensor:
        x = self.embedding(tokens) if isinstance(self.embedding, nn.Embedding) else self.embedding(tokens, ctx)
        for embedding in self.input_embeddings:
            if ctx.decode is None:
                x = x + embedding(tokens)
            else:  # the new tokens with the earlier ones they read
                earlier = lookback(embedding, default=ctx.decode.length)
                x = x + embedding(ctx.decode.tokens[:, -(tokens.shape[1] + earlier) :])[:, -tokens.shape[1] :]
        return self.encoder(x, ctx)

    def encode(self, tokens: Tensor, positions: Tensor | None = None, doc_ids: Tensor | None = None, structure: Tensor | None = None) -> Tensor:
        """Token ids [B, T] (integer positions [B, T], default 0..T-1; document ids [B, T] of a packed
        window, default one document; per-token structure [B, T, L] for mixers that read it) ->
        representations [B, T, D]. MTP heads are skipped."""
        return self.final_norm(self._hidden(tokens, self._context(tokens, positions, doc_ids, structure)))

    def encode_with_mtp(
        self, tokens: Tensor, positions: Tensor | None = None, doc_ids: Tensor | None = None, structure: Tensor | None = None
    ) -> tuple[Tensor, list[MTPPrediction]]:
        """`encode`, plus the predictions of every MTP head (in-block heads in layer order, then the
        sequential modules)."""
        ctx = self._context(tokens, positions, doc_ids, structure)
        ctx.mtp = []
        hidden = self._hidden(tokens, ctx)
        if self.mtp is not None:
            ctx.mtp.extend(self.mtp(hidden, tokens, self.embedding, ctx))
        return self.final_norm(hidden), ctx.mtp

    def extend(
        self, tokens: Tensor, state: DecodeState, structure: Tensor | None = None, mtp: bool = False
    ) -> tuple[Tensor, list[MTPPrediction]]:
        """Incremental forward: tokens [B, n] (and their structure rows [B, n, L], for mixers that read it)
        continue the sequence `state` holds (an empty state: they are the prompt). -> the final
        representations of the new positions [B, n, D], equal to `encode` of the whole sequence at those
        positions; with `mtp`, the predictions of the in-block MTP heads (not the sequential modules) there."""
        ctx = SequenceContext(positions=state.append(tokens, structure), structure=structure, decode=state, mtp=[] if mtp else None)
        return self.final_norm(self._hidden(tokens, ctx)), ctx.mtp or []

    def predict(self, representations: Tensor) -> Tensor:
        return self.predictor(representations)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, doc_ids: Tensor | None = None, structure: Tensor | None = None) -> Tensor:
        """Token ids [B, T] -> logits [B, T, vocab]."""
        return self.predict(self.encode(tokens, positions, doc_ids, structure))

"""Decoders: the next-token logits of a growing sequence, and greedy self-speculative decoding.

`Decoder` runs one of four paths: "recompute" the whole sequence with the plain forward pass (the reference);
"cache": incrementally through a DecodeState (nn/decode.py) with growing caches (every architecture);
"static": through static caches, the one-token step eager; "graph": that step replayed as a CUDA graph
(cuda_graph.py).

MoE layers decode dropless: capacity-factor dropping depends on how many tokens share the forward pass
(the capacity grows with the sequence), so a position's output would change as the sequence grows and a
cache could never reproduce it. Every path therefore runs with `capacity_factor` switched off (`dropless`:
every component in its `decoding()` mode, nn/protocols.py), which is the usual inference rule.
"""

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from soma_lightning.data_modules.structure import StructureScanner, batch_structure
from soma_lightning.errors import UserError
from soma_lightning.generation.cuda_graph import static_decoder
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.protocols import decoding, mtp_horizons, reads_structure
from soma_lightning.vocabulary import BYTE_VOCABULARY, Vocabulary


def dropless(model: nn.Module) -> AbstractContextManager[None]:
    """Every component of `model` in its `decoding()` mode for the duration: MoE layers without capacity
    dropping (see the module docstring)."""
    return decoding(model)


@dataclass
class Generation:
    """`tokens`: the emitted ids per row (EOS included when emitted); `stop_reasons`: "eos",
    "max_new_tokens" or "no_allowed_token (after PROCESSOR)"; `trace`: one record per emitted token when
    asked for; `forward_passes`, `drafted`, `accepted`: decoding statistics (drafts: speculative only);
    `vocabulary`: what the ids mean, which `texts` decodes them with."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    trace: list[dict] = field(default_factory=list)
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    vocabulary: Vocabulary = BYTE_VOCABULARY

    @property
    def texts(self) -> list[str]:
        return [self.vocabulary.decode(row) for row in self.tokens]


def emittable(vocab_size: int, vocab_ranges: dict[str, list[int]] | None, vocabulary: Vocabulary, device: torch.device) -> Tensor:
    """The ids that may be emitted: the vocabulary's ids [0, size) (the bytes, or the tokenizer's) and EOS,
    never PAD nor the unused ids above; with a declared token space, every id of its ranges but PAD."""
    keep = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if vocab_ranges is None:
        keep[: vocabulary.size] = True
    else:
        for start, end in vocab_ranges.values():
            keep[start:end] = True
        keep[vocabulary.pad] = False
    keep[vocabulary.eos] = True
    return keep


class _Structure:
    """Per-row structure scanners (data_modules/structure.py): the rows of new tokens, continuing the scan."""

    def __init__(self, batch: int) -> None:
        self.scanners = [StructureScanner() for _ in range(batch)]

    def rows(self, tokens: Tensor) -> Tensor:
        rows = [[scanner.push(t) for t in row] for scanner, row in zip(self.scanners, tokens.tolist())]
        return torch.tensor(rows, dtype=torch.long, device=tokens.device)


class Decoder:
    """Next-token logits of a growing sequence by `decoding` ("recompute", "cache", "static" or "graph", see
    the module docstring)."""

    def __init__(self, model: SomaModel, batch: int, capacity: int, decoding: str, record_attention: bool = False) -> None:
        self.model = model
        self.state = DecodeState(capacity, record_attention=record_attention) if decoding == "cache" else None
        device = next(model.parameters()).device
        self.static = static_decoder(model, batch, capacity, device, decoding == "graph") if decoding in ("static", "graph") else None
        self.structure = _Structure(batch) if reads_structure(model) else None
        self.tokens: Tensor | None = None  # the whole sequence (full recompute only)
        self.length = 0  # tokens fed so far
        self.passes = 0

    def logits(self, new: Tensor, mtp: bool = False) -> tuple[Tensor, list]:
        """Feed `new` [B, n]; -> logits [B, n, V] at the new positions and (cached, `mtp`) the MTP
        predictions there."""
        self.passes += 1
        self.length += new.shape[1]
        if self.static is not None:
            return self.static.feed(self.model, new, self.length - new.shape[1]), []
        if self.state is not None:
            rows = self.structure.rows(new) if self.structure is not None else None
            reps, predictions = self.model.extend(new, self.state, rows, mtp=mtp)
            return self.model.predict(reps), predictions
        self.tokens = new if self.tokens is None else torch.cat([self.tokens, new], dim=1)
        structure = batch_structure(self.tokens).to(new.device) if self.structure is not None else None
        return self.model(self.tokens, structure=structure)[:, -new.shape[1] :], []


def speculative_decode(
    model: SomaModel, prompt: Tensor, max_new_tokens: int, vocab_ranges: dict[str, list[int]] | None = None, vocabulary: Vocabulary = BYTE_VOCABULARY
) -> Generation:
    """Greedy self-speculative decoding. At the last accepted position t the main head gives token t+1
    (exact) and the last layer's H MTP heads draft t+2..t+1+H; one pass over those 1 + H tokens verifies the
    drafts against the main head's greedy choices, keeps the longest agreeing prefix (plus the main head's
    token after it) and rolls the caches back to it. Choices and drafts range over the emittable ids, as
    in plain decoding: the same tokens as plain greedy decoding, in fewer forward passes."""
    horizons_per_head = [n for n in map(mtp_horizons, model.encoder.modules()) if n]  # in layer order
    if not horizons_per_head:
        raise UserError("speculative: the model has no in-block MTP heads (mtp_heads) to draft with")
    horizons = horizons_per_head[-1]
    decoder = Decoder(model, 1, prompt.shape[1] + max_new_tokens + horizons + 1, "cache")
    if decoder.structure is not None:
        raise UserError("speculative: not supported for models with a structural attention bias (the structure scan cannot roll back)")

    allowed = emittable(model.predictor.out_features, vocab_ranges, vocabulary, prompt.device)
    eos = vocabulary.eos

    def greedy_choices(logits: Tensor, predictions: list, last_only: bool) -> list[list[int]]:
        """[1 + H][n]: the main head's greedy ids and each MTP head's drafts at the pass's n positions (only
        its last for the prompt), in one transfer to the host."""
        at = slice(-1, None) if last_only else slice(None)
        drafts = model.predict(torch.stack([p.representations[0, at] for p in predictions[-horizons:]]))
        return torch.cat([logits[:, at], drafts]).masked_fill(~allowed, float("-inf")).argmax(dim=-1).tolist()

    out = Generation(tokens=[[]], stop_reasons=["max_new_tokens"], vocabulary=vocabulary)
    choices = greedy_choices(*decoder.logits(prompt, mtp=True), last_only=True)
    index = 0  # the position (within the last pass's choices) of the last accepted token
    emitted = out.tokens[0]
    while len(emitted) < max_new_tokens:
        token, drafts = choices[0][index], [row[index] for row in choices[1:]]
        emitted.append(token)
        if token == eos:
            out.stop_reasons[0] = "eos"
            break
        if len(emitted) == max_new_tokens:
            break
        decoder.state.keep_steps = True
        length = decoder.state.length
        choices = greedy_choices(*decoder.logits(torch.tensor([[token] + drafts], device=prompt.device), mtp=True), last_only=False)
        greedy = choices[0]
        accepted = 0
        while accepted < horizons and drafts[accepted] == greedy[accepted] and len(emitted) < max_new_tokens:
            emitted.append(drafts[accepted])
            accepted += 1
            if drafts[accepted - 1] == eos:
                break
        out.drafted, out.accepted = out.drafted + horizons, out.accepted + accepted
        if emitted[-1] == eos:
            out.stop_reasons[0] = "eos"
            break
        decoder.state.rollback(length + 1 + accepted)
        index = accepted
    out.forward_passes = decoder.passes
    return out

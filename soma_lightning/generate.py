"""Generation for every architecture: incremental decoding (nn/decode.py), constraints as logits processors
(constraints.py), per-token provenance traces, and self-speculative decoding with in-block MTP heads.

Prompts and outputs are token ids of the V1 byte contract (data_modules/contract.py): bytes 0-255 and EOS;
only those are ever emitted (PAD and unused ids are masked), and EOS ends a row. A model with a declared
token space (`vocab_ranges`) may emit every id of it but PAD.

MoE layers decode dropless: capacity-factor dropping depends on how many tokens share the forward pass
(the capacity grows with the sequence), so a position's output would change as the sequence grows and a
cache could never reproduce it. Both the cached and the full-recompute path therefore run with
`capacity_factor` switched off (`dropless`), which is the usual inference rule.

Three decoding paths: full recompute (`use_cache=False`, the reference); the cached path, eager, with caches
that grow (every architecture); and on CUDA, when every layer supports static decoding (`static_blocker`:
`mha`, `gqa` without a structural bias, `gelu_mlp`, in-block MTP heads, LayerNorm / RMSNorm, the plain
token embedding), the cached path over static caches (nn/decode.py) whose one-token step is captured once
as a CUDA graph and replayed for every token, gpt-fast style: an eager step is many small kernel launches
per layer and host-bound at small batch. The prompt's prefill stays eager (its length varies) and fills the static caches.
Gated DeltaNet, SOSM's semantic state and graph attention, a structural bias, hashed n-gram embeddings and
MoE (routing with data-dependent shapes) decode on the eager cached path.
"""

import itertools
import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.constraints import LogitsProcessor
from soma_lightning.data_modules.contract import EOS, PAD
from soma_lightning.data_modules.structure import StructureScanner, batch_structure
from soma_lightning.errors import UserError
from soma_lightning.nn.attention import MultiHeadAttention
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.ffn import GeluMLP
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.moe import MoE
from soma_lightning.nn.mtp import MTPHeads
from soma_lightning.nn.semantic_graph import EDGE_TYPES

TOP_POSITIONS = 5  # prompt positions listed per emitted token in a trace
STATIC_CAPACITY_STEP = 256  # static caches are sized in multiples of this, so that similar lengths share one graph
GRAPH_WARMUP = 3  # eager steps on a side stream before capture (lazy initialisation must not be captured)


@contextmanager
def dropless(model: nn.Module):
    """Every MoE layer of `model` without capacity dropping for the duration (see the module docstring)."""
    routed = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.capacity_factor for m in routed]
    for m in routed:
        m.capacity_factor = None
    try:
        yield
    finally:
        for m, capacity in zip(routed, saved):
            m.capacity_factor = capacity


def reads_structure(model: nn.Module) -> bool:
    return any(isinstance(m, GroupedQueryAttention) and m.structure_bias is not None for m in model.modules())


@dataclass
class Generation:
    """`tokens`: the emitted ids per row (EOS included when emitted); `stop_reasons`: "eos",
    "max_new_tokens" or "no_allowed_token (after PROCESSOR)"; `trace`: one record per emitted token when
    asked for; `forward_passes`, `drafted`, `accepted`: decoding statistics (drafts: speculative only)."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    trace: list[dict] = field(default_factory=list)
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def texts(self) -> list[str]:
        return [bytes(t for t in row if t < 256).decode("utf-8", errors="replace") for row in self.tokens]


def as_prompt(prompt: str | bytes | list[int] | list[list[int]] | Tensor, vocab_size: int, device: torch.device) -> Tensor:
    """A prompt as [B, T] token ids: text is encoded as UTF-8 bytes; rows must have equal lengths."""
    if isinstance(prompt, str):
        prompt = prompt.encode()
    if isinstance(prompt, (bytes, bytearray)):
        prompt = [list(prompt)]
    if not isinstance(prompt, Tensor):
        if prompt and not isinstance(prompt[0], (list, tuple)):
            prompt = [prompt]
        if len({len(row) for row in prompt}) > 1:
            raise UserError(f"prompt: rows must have equal lengths (no padding yet), got {sorted({len(r) for r in prompt})}")
        prompt = torch.tensor(prompt, dtype=torch.long)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise UserError(f"prompt: expected non-empty rows of token ids [B, T], got shape {list(prompt.shape)}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise UserError(f"prompt: token ids must lie in 0..{vocab_size - 1}")
    return prompt.long().to(device)


class _Structure:
    """Per-row structure scanners (data_modules/structure.py): the rows of new tokens, continuing the scan."""

    def __init__(self, batch: int) -> None:
        self.scanners = [StructureScanner() for _ in range(batch)]

    def rows(self, tokens: Tensor) -> Tensor:
        rows = [[scanner.push(t) for t in row] for scanner, row in zip(self.scanners, tokens.tolist())]
        return torch.tensor(rows, dtype=torch.long, device=tokens.device)


STATIC_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.Dropout, GeluMLP, MTPHeads, MultiHeadAttention)


def static_blocker(model: SomaModel) -> str | None:
    """None when every module that decoding runs supports static decoding (and so the CUDA graph): those of
    STATIC_MODULES and `gqa` without a structural bias; otherwise the first that does not, as `name (Type)`."""
    if len(model.input_embeddings):
        return f"input_embeddings.0 ({type(model.input_embeddings[0]).__name__})"
    modules = [("embedding", model.embedding), ("final_norm", model.final_norm)]
    modules += [(f"encoder.layers.{i}.{name}", m) for i, block in enumerate(model.encoder.layers) for name, m in block.named_children()]
    for name, module in modules:
        if not (isinstance(module, STATIC_MODULES) or (isinstance(module, GroupedQueryAttention) and module.structure_bias is None)):
            return f"{name} ({type(module).__name__})"
    return None


class _StaticDecoder:
    """Static decoding of one model at one batch size: the state with its static caches (allocated by the
    first pass), the position tensor the state reads, and the one-token step, captured as a CUDA graph at its
    first use when `graph` and replayed from then on. Kept between `generate` calls (`_static_decoder`), so
    that a model captures once per batch size and capacity."""

    def __init__(self, key: tuple, batch: int, capacity: int, device: torch.device, graph: bool) -> None:
        self.key, self.capacity, self.use_graph = key, capacity, graph
        self.state = DecodeState(capacity, position=torch.zeros((), dtype=torch.long, device=device))
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the step's output, overwritten by every replay

    def _step(self, model: SomaModel) -> Tensor:
        return model.predict(model.extend(self.tokens, self.state)[0])

    def feed(self, model: SomaModel, new: Tensor, start: int) -> Tensor:
        """Feed `new` at positions start, start + 1, ...: the prompt [B, n] (start 0), then one token [B, 1]
        per step; -> logits [B, n, V]."""
        self.state.position.fill_(start)
        if start == 0:  # the prompt, eager (its length varies); the first one allocates the caches
            return model.predict(model.extend(new, self.state)[0])
        self.tokens.copy_(new)
        if not self.use_graph:
            return self._step(model)
        with torch.cuda.device(self.tokens.device):  # streams and replay belong to the current device
            if self.graph is None:
                self._capture(model)
            self.graph.replay()
        return self.logits

    def _capture(self, model: SomaModel) -> None:
        """Warm up on a side stream, then capture the step (the PyTorch recipe). Autocast's cache of cast
        weights is off meanwhile: the graph would keep reading the cast copies after the cache frees them."""
        autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with autocast, torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):  # each writes this step's keys and values, as every replay does
                self._step(model)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with autocast, torch.cuda.graph(self.graph):
            self.logits = self._step(model)


_static_decoders: "weakref.WeakKeyDictionary[SomaModel, _StaticDecoder]" = weakref.WeakKeyDictionary()


def _static_decoder(model: SomaModel, batch: int, length: int, device: torch.device, graph: bool) -> _StaticDecoder:
    """The model's kept static decoder if it fits (the same batch size, parameter tensors and autocast
    setting, which a captured graph bakes in, and a capacity of at least `length`), else a new one in its
    place, its capacity `length` rounded up to STATIC_CAPACITY_STEP."""
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    tensors = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    key = (batch, device, graph, autocast, tensors)
    kept = _static_decoders.get(model)
    if kept is None or kept.key != key or kept.capacity < length:
        _static_decoders.pop(model, None)  # free its caches and graph before allocating the new ones
        capacity = -(-length // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
        _static_decoders[model] = kept = _StaticDecoder(key, batch, capacity, device, graph)
    return kept


class _Decoder:
    """Next-token logits of a growing sequence, by `decoding`: "recompute" the whole sequence with the plain
    forward pass (the reference); "cache": incrementally through a DecodeState with growing caches;
    "static": through static caches, the one-token step eager; "graph": that step replayed as a CUDA graph."""

    def __init__(self, model: SomaModel, batch: int, capacity: int, decoding: str, record_attention: bool = False) -> None:
        self.model = model
        self.state = DecodeState(capacity, record_attention=record_attention) if decoding == "cache" else None
        device = next(model.parameters()).device
        self.static = _static_decoder(model, batch, capacity, device, decoding == "graph") if decoding in ("static", "graph") else None
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


def _emittable(vocab_size: int, vocab_ranges: dict[str, list[int]] | None, device: torch.device) -> Tensor:
    """The ids that may be emitted: bytes and EOS (the V1 byte contract); with a declared token space, every
    id of its ranges but PAD."""
    keep = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if vocab_ranges is None:
        keep[:256] = True
    else:
        for start, end in vocab_ranges.values():
            keep[start:end] = True
        keep[PAD] = False
    keep[EOS] = True
    return keep


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """-> (chosen ids [B], the distribution they were drawn from [B, V]). temperature 0: greedy."""
    if temperature == 0:
        chosen = logits.argmax(dim=-1)
        return chosen, F.one_hot(chosen, logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - ordered.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs


def _attention_layer(model: SomaModel) -> tuple[str, nn.Module] | None:
    """The last softmax-attention mixer of the main layers (whose weights a trace reports)."""
    found = [(name, m) for name, m in model.encoder.named_modules() if isinstance(m, (MultiHeadAttention, GroupedQueryAttention, GraphAttention))]
    return (f"encoder.{found[-1][0]}", found[-1][1]) if found else None


def _finite(x: Tensor) -> float | None:
    """A logit for JSON: None for -inf (a masked id)."""
    return float(x) if x.isfinite() else None


def _byte(t: int) -> str:
    return bytes([t]).decode("latin-1") if t < 256 else "<EOS>" if t == EOS else f"<{t}>"


def _provenance(state: DecodeState, layer: tuple[str, nn.Module] | None, row: int, tokens: Tensor, prompt_length: int) -> dict:
    """The attention (mean over heads) of the newest query of `row` in the last attention layer: its top
    prompt positions; for SOSM also the query's graph edges."""
    out: dict = {}
    if layer is not None and layer[1] in state.attention:
        weights = state.attention[layer[1]][row, :, -1].mean(dim=0)  # [T]
        prompt = weights[:prompt_length]
        top = prompt.topk(min(TOP_POSITIONS, prompt_length))
        out["attention"] = {
            "layer": layer[0],
            "heads": "mean",
            "top_prompt_positions": [
                {"position": j, "byte": _byte(int(tokens[row, j])), "weight": round(w, 6)} for w, j in zip(top.values.tolist(), top.indices.tolist())
            ],
        }
    if state.graph is not None:
        weights = state.attention[layer[1]][row, :, -1].mean(dim=0) if layer is not None and layer[1] in state.attention else None
        edges = []
        for j, kind in zip(state.graph.neighbors[row, -1].tolist(), state.graph.edge_type[row, -1].tolist()):
            if j >= 0:
                edge = {"position": j, "byte": _byte(int(tokens[row, j])), "type": EDGE_TYPES[kind]}
                if weights is not None:
                    edge["weight"] = round(float(weights[j]), 6)
                edges.append(edge)
        out["graph_edges"] = edges
    return out


@torch.no_grad()
def generate(
    model: SomaModel,
    prompt_tokens: str | bytes | list[int] | list[list[int]] | Tensor,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    processors: list[LogitsProcessor] = (),
    use_cache: bool = True,
    trace: bool = False,
    speculative: bool = False,
    cuda_graph: bool | None = None,
    vocab_ranges: dict[str, list[int]] | None = None,
) -> Generation:
    """Continue each prompt row by up to `max_new_tokens` tokens. temperature 0 is greedy; otherwise
    softmax sampling at `temperature`, restricted to the `top_k` most likely ids and the smallest set
    reaching probability `top_p`, drawn from a generator seeded with `seed`. `processors` (constraints.py)
    run in order on the logits before sampling; a row whose logits they leave all -inf stops with reason
    "no_allowed_token". `use_cache` False recomputes the whole sequence for every token (the reference).
    `trace`: record each emitted token's probability, the processors' decisions and its provenance (needs
    the cache). `speculative`: draft with the last layer's MTP heads and verify with the main head (greedy,
    one row, no processors): the same tokens as plain greedy decoding, in fewer forward passes.
    `cuda_graph`: replay the cached one-token step as a CUDA graph (static caches, see the module docstring);
    None: whenever the model is on CUDA, every layer supports it (`static_blocker`), and neither `trace`,
    `speculative` nor `use_cache` False asks for the eager path. `vocab_ranges`: the token space of a model
    trained on one (its spec's `vocab_ranges`): ids of every range but PAD may be emitted; None: bytes and
    EOS only."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise UserError(f"sampling: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if trace and not use_cache:
        raise UserError("trace: provenance is recorded by the cached decoder; drop --no-cache")
    device = next(model.parameters()).device
    blocker = static_blocker(model)
    if cuda_graph:
        if device.type != "cuda":
            raise UserError(f"cuda_graph: needs the model on a CUDA device, it is on {device}")
        if not use_cache or trace or speculative:
            raise UserError("cuda_graph: replays the cached one-token step; not with the cache off, a trace or speculative decoding")
        if blocker is not None:
            raise UserError(f"cuda_graph: {blocker} has no static decoding (see soma_lightning/generate.py); use the eager cache")
    elif cuda_graph is None:
        cuda_graph = device.type == "cuda" and use_cache and not trace and not speculative and blocker is None
    prompt = as_prompt(prompt_tokens, model.predictor.out_features, device)
    was_training = model.training
    model.eval()
    try:
        with dropless(model):
            if speculative:
                if temperature != 0 or processors or trace or not use_cache or prompt.shape[0] != 1:
                    raise UserError("speculative: needs greedy decoding (temperature 0), one prompt row, the cache, no processors and no trace")
                return _speculative(model, prompt, max_new_tokens, vocab_ranges)
            decoding = "graph" if cuda_graph else "cache" if use_cache else "recompute"
            return _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, list(processors), decoding, trace, vocab_ranges)
    finally:
        model.train(was_training)


def _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, processors, decoding, trace, vocab_ranges=None) -> Generation:
    """The decoding loop (`decoding`: see _Decoder). Without a trace, one transfer to the host per step."""
    b, prompt_length = prompt.shape
    decoder = _Decoder(model, b, prompt_length + max_new_tokens, decoding, record_attention=trace)
    generator = torch.Generator(prompt.device).manual_seed(seed) if temperature > 0 else None
    emittable = _emittable(model.predictor.out_features, vocab_ranges, prompt.device)
    layer = _attention_layer(model) if trace else None
    out = Generation(tokens=[[] for _ in range(b)], stop_reasons=["max_new_tokens"] * b)
    finished = [False] * b
    stopped = torch.zeros(b, dtype=torch.bool, device=prompt.device)  # `finished` on the device
    tokens, new = prompt, prompt
    for step in range(max_new_tokens):
        raw = decoder.logits(new)[0][:, -1].float()
        logits = raw.masked_fill(~emittable, float("-inf"))
        stages = []
        for processor in processors:
            before, logits = logits, processor(tokens, prompt_length, logits)
            stages.append((processor.name, before, logits))
        dead = ~logits.isfinite().any(dim=-1)
        chosen, sampled = _sample(logits.masked_fill(dead[:, None], 0.0), temperature, top_k, top_p, generator)
        chosen_ids, dead_rows = torch.stack([chosen, dead.long()]).tolist()
        model_probs = raw.softmax(dim=-1) if trace else None
        for row in range(b):
            if finished[row]:
                continue
            if dead_rows[row]:
                culprit = next(name for name, _, after in stages if not after[row].isfinite().any())
                out.stop_reasons[row], finished[row] = f"no_allowed_token (after {culprit})", True
                continue
            t = chosen_ids[row]
            out.tokens[row].append(t)
            if trace:
                record = {"row": row, "step": step, "position": tokens.shape[1], "token": t, "byte": _byte(t),
                          "probability": round(float(model_probs[row, t]), 6), "sampling_probability": round(float(sampled[row, t]), 6),
                          "constraints": [{"name": name, "allowed": int(after[row].isfinite().sum()),
                                           "logit_before": _finite(before[row, t]), "logit_after": _finite(after[row, t])} for name, before, after in stages]}
                out.trace.append(record | _provenance(decoder.state, layer, row, tokens, prompt_length))
            if t == EOS:
                out.stop_reasons[row], finished[row] = "eos", True
        if all(finished):
            break
        stopped |= dead | (chosen == EOS)
        new = torch.where(stopped, EOS, chosen)[:, None]
        tokens = torch.cat([tokens, new], dim=1)
    out.forward_passes = decoder.passes
    return out


def _speculative(model: SomaModel, prompt: Tensor, max_new_tokens: int, vocab_ranges: dict[str, list[int]] | None = None) -> Generation:
    """Greedy self-speculative decoding. At the last accepted position t the main head gives token t+1
    (exact) and the last layer's H MTP heads draft t+2..t+1+H; one pass over those 1 + H tokens verifies the
    drafts against the main head's greedy choices, keeps the longest agreeing prefix (plus the main head's
    token after it) and rolls the caches back to it. Choices and drafts range over the emittable ids, as
    in plain decoding."""
    heads = [m for m in model.encoder.modules() if isinstance(m, MTPHeads)]
    if not heads:
        raise UserError("speculative: the model has no in-block MTP heads (mtp_heads) to draft with")
    horizons = len(heads[-1].heads)
    decoder = _Decoder(model, 1, prompt.shape[1] + max_new_tokens + horizons + 1, "cache")
    if decoder.structure is not None:
        raise UserError("speculative: not supported for models with a structural attention bias (the structure scan cannot roll back)")

    emittable = _emittable(model.predictor.out_features, vocab_ranges, prompt.device)

    def greedy_choices(logits: Tensor, predictions: list, last_only: bool) -> list[list[int]]:
        """[1 + H][n]: the main head's greedy ids and each MTP head's drafts at the pass's n positions (only
        its last for the prompt), in one transfer to the host."""
        at = slice(-1, None) if last_only else slice(None)
        drafts = model.predict(torch.stack([p.representations[0, at] for p in predictions[-horizons:]]))
        return torch.cat([logits[:, at], drafts]).masked_fill(~emittable, float("-inf")).argmax(dim=-1).tolist()

    out = Generation(tokens=[[]], stop_reasons=["max_new_tokens"])
    choices = greedy_choices(*decoder.logits(prompt, mtp=True), last_only=True)
    index = 0  # the position (within the last pass's choices) of the last accepted token
    emitted = out.tokens[0]
    while len(emitted) < max_new_tokens:
        token, drafts = choices[0][index], [row[index] for row in choices[1:]]
        emitted.append(token)
        if token == EOS:
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
            if drafts[accepted - 1] == EOS:
                break
        out.drafted, out.accepted = out.drafted + horizons, out.accepted + accepted
        if emitted[-1] == EOS:
            out.stop_reasons[0] = "eos"
            break
        decoder.state.rollback(length + 1 + accepted)
        index = accepted
    out.forward_passes = decoder.passes
    return out


def write_trace(path: str | Path, records: list[dict]) -> None:
    """The trace as JSON lines, written atomically."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))

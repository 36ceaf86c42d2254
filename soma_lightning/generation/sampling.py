"""`generate`: checks the arguments, picks the decoding path, and runs the sampling loop, which applies the
logits processors, samples, and records traces."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from soma_lightning.errors import UserError
from soma_lightning.generation.constraints import LogitsProcessor, TextConstraint
from soma_lightning.generation.cuda_graph import static_blocker
from soma_lightning.generation.decoders import Decoder, Generation, dropless, emittable, speculative_decode
from soma_lightning.generation.trace import Stage, attention_layer, token_record
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.protocols import reads_structure
from soma_lightning.vocabulary import BYTE_VOCABULARY, Vocabulary


def as_prompt(
    prompt: str | bytes | list[int] | list[list[int]] | Tensor, vocab_size: int, device: torch.device, vocabulary: Vocabulary = BYTE_VOCABULARY
) -> Tensor:
    """A prompt as [B, T] token ids: text is encoded by `vocabulary` (its UTF-8 bytes, or the tokenizer's ids);
    rows must have equal lengths."""
    if isinstance(prompt, bytearray):
        prompt = bytes(prompt)
    if isinstance(prompt, (str, bytes)):
        prompt = [vocabulary.encode(prompt)]
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


def choose_tokens(
    logits: Tensor, tokens: Tensor, prompt_length: int, processors: Sequence[LogitsProcessor], temperature: float, top_k: int | None,
    top_p: float | None, generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, list[Stage]]:
    """The processors applied in order to logits [B, V] of the rows `tokens` [B, T] (each stage recorded for
    traces), then one token drawn per row -> (chosen ids [B], their distribution [B, V], dead [B]: no token
    allowed, the row's choice meaningless, the stages)."""
    stages: list[Stage] = []
    for processor in processors:
        before, logits = logits, processor(tokens, prompt_length, logits)
        stages.append((processor.name, before, logits))
    dead = ~logits.isfinite().any(dim=-1)
    chosen, sampled = _sample(logits.masked_fill(dead[:, None], 0.0), temperature, top_k, top_p, generator)
    return chosen, sampled, dead, stages


def _generate(
    model: SomaModel, prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int,
    processors: list[LogitsProcessor], decoding: str, trace: bool, vocab_ranges: dict[str, list[int]] | None = None,
    vocabulary: Vocabulary = BYTE_VOCABULARY,
) -> Generation:
    """The sampling loop over a Decoder's `decoding` path. Without a trace, one transfer to the host per step."""
    b, prompt_length = prompt.shape
    decoder = Decoder(model, b, prompt_length + max_new_tokens, decoding, record_attention=trace)
    generator = torch.Generator(prompt.device).manual_seed(seed) if temperature > 0 else None
    allowed = emittable(model.predictor.out_features, vocab_ranges, vocabulary, prompt.device)
    eos = vocabulary.eos
    layer = None  # the attention layer a trace reports: known after the first pass
    out = Generation(tokens=[[] for _ in range(b)], stop_reasons=["max_new_tokens"] * b, vocabulary=vocabulary)
    finished = [False] * b
    stopped = torch.zeros(b, dtype=torch.bool, device=prompt.device)  # `finished` on the device
    tokens, new = prompt, prompt
    for step in range(max_new_tokens):
        raw = decoder.logits(new)[0][:, -1].float()
        if trace and step == 0:
            layer = attention_layer(model, decoder.state)
        logits = raw.masked_fill(~allowed, float("-inf"))
        chosen, sampled, dead, stages = choose_tokens(logits, tokens, prompt_length, processors, temperature, top_k, top_p, generator)
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
                out.trace.append(token_record(row, step, t, tokens, prompt_length, model_probs, sampled, stages, decoder.state, layer, vocabulary))
            if t == eos:
                out.stop_reasons[row], finished[row] = "eos", True
        if all(finished):
            break
        stopped |= dead | (chosen == eos)
        new = torch.where(stopped, eos, chosen)[:, None]
        tokens = torch.cat([tokens, new], dim=1)
    out.forward_passes = decoder.passes
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
    processors: Sequence[LogitsProcessor] = (),
    use_cache: bool = True,
    trace: bool = False,
    speculative: bool = False,
    cuda_graph: bool | None = None,
    vocab_ranges: dict[str, list[int]] | None = None,
    vocabulary: Vocabulary = BYTE_VOCABULARY,
) -> Generation:
    """Continue each prompt row by up to `max_new_tokens` tokens. temperature 0 is greedy; otherwise
    softmax sampling at `temperature`, restricted to the `top_k` most likely ids and the smallest set
    reaching probability `top_p`, drawn from a generator seeded with `seed`. `processors` (constraints.py)
    run in order on the logits before sampling; a row whose logits they leave all -inf stops with reason
    "no_allowed_token". `use_cache` False recomputes the whole sequence for every token (the reference).
    `trace`: record each emitted token's probability, the processors' decisions and its provenance (needs
    the cache). `speculative`: draft with the last layer's MTP heads and verify with the main head (greedy,
    one row, no processors): the same tokens as plain greedy decoding, in fewer forward passes.
    `cuda_graph`: replay the cached one-token step as a CUDA graph (static caches, see cuda_graph.py);
    None: whenever the model is on CUDA, every layer supports it (`static_blocker`), and neither `trace`,
    `speculative` nor `use_cache` False asks for the eager path. `vocab_ranges`: the token space of a model
    trained on one (its spec's `vocab_ranges`): ids of every range but PAD may be emitted; None: the
    vocabulary's ids and EOS only. `vocabulary`: what the ids mean (the model's, `SomaLM.vocabulary`): its EOS
    ends a row, text prompts are encoded and `texts` decoded with it; the processors that constrain bytes
    (`TextConstraint`s) and structure scanning need the byte vocabulary."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise UserError(f"sampling: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if trace and not use_cache:
        raise UserError("trace: provenance is recorded by the cached decoder; drop --no-cache")
    if not vocabulary.is_bytes:
        for processor in processors:
            if isinstance(processor, TextConstraint):
                raise UserError(f"{processor.name}: constrains bytes, but the vocabulary is {vocabulary.tokenizer}, whose tokens are multi-byte pieces")
        if reads_structure(model):
            raise UserError(f"structure_buckets: the model's structural attention bias scans bytes, but its vocabulary is {vocabulary.tokenizer}")
    device = next(model.parameters()).device
    blocker = static_blocker(model)
    if cuda_graph:
        if device.type != "cuda":
            raise UserError(f"cuda_graph: needs the model on a CUDA device, it is on {device}")
        if not use_cache or trace or speculative:
            raise UserError("cuda_graph: replays the cached one-token step; not with the cache off, a trace or speculative decoding")
        if blocker is not None:
            raise UserError(f"cuda_graph: {blocker} has no static decoding (see soma_lightning/generation/cuda_graph.py); use the eager cache")
    elif cuda_graph is None:
        cuda_graph = device.type == "cuda" and use_cache and not trace and not speculative and blocker is None
    vocab_size = model.predictor.out_features
    if max(vocabulary.pad, vocabulary.eos) >= vocab_size:
        raise UserError(f"vocabulary: {vocabulary.tokenizer} needs ids up to {max(vocabulary.pad, vocabulary.eos)} (its PAD and EOS), the model has {vocab_size}")
    prompt = as_prompt(prompt_tokens, vocab_size, device, vocabulary)
    was_training = model.training
    model.eval()
    try:
        with dropless(model):
            if speculative:
                if temperature != 0 or processors or trace or not use_cache or prompt.shape[0] != 1:
                    raise UserError("speculative: needs greedy decoding (temperature 0), one prompt row, the cache, no processors and no trace")
                return speculative_decode(model, prompt, max_new_tokens, vocab_ranges, vocabulary)
            decoding = "graph" if cuda_graph else "cache" if use_cache else "recompute"
            return _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, list(processors), decoding, trace, vocab_ranges, vocabulary)
    finally:
        model.train(was_training)

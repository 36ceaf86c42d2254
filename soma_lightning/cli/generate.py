"""`soma-lightning generate`: continue a prompt with a trained model."""

import sys
from pathlib import Path
from typing import Literal

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.checkpoints import load_module
from soma_lightning.data_modules.contract import EOS
from soma_lightning.data_modules.modalities import TokenSpace
from soma_lightning.data_modules.modalities import prompt as modality_prompt
from soma_lightning.errors import UserError
from soma_lightning.generation import generate as generate_tokens
from soma_lightning.generation import write_trace
from soma_lightning.generation.constraints import AllowedTokens, DeniedTokens, FactVocabulary, LogitsProcessor, RegexConstraint, RepetitionPenalty
from soma_lightning.quantize import Mode
from soma_lightning.quantize import quantize as quantize_weights
from soma_lightning.v1 import check_device


def constraints(
    allowed_bytes: str | None, denied_bytes: str | None, facts: str | None, regex: str | None, repetition_penalty: float | None
) -> list[LogitsProcessor]:
    """The logits processors the generate flags ask for, in the order they apply."""
    processors: list[LogitsProcessor] = []
    if allowed_bytes is not None:
        processors.append(AllowedTokens(list(allowed_bytes.encode()) + [EOS]))
    if denied_bytes is not None:
        processors.append(DeniedTokens(list(denied_bytes.encode())))
    if facts is not None:
        path = Path(facts)
        if not path.is_file():
            raise UserError(f"--facts: {facts!r} is not a file")
        processors.append(FactVocabulary([line for line in path.read_text().splitlines() if line.strip()]))
    if regex is not None:
        processors.append(RegexConstraint(regex))
    if repetition_penalty is not None:
        processors.append(RepetitionPenalty(repetition_penalty))
    return processors


def generate(
    ckpt: str,
    prompt: str,
    which: Literal["best", "last"] = "last",
    tokenizer: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    allowed_bytes: str | None = None,
    denied_bytes: str | None = None,
    facts: str | None = None,
    regex: str | None = None,
    repetition_penalty: float | None = None,
    trace: str | None = None,
    speculative: bool = False,
    no_cache: bool = False,
    cuda_graph: bool | None = None,
    modality: Literal["text", "image", "audio"] = "text",
    tokens_out: str | None = None,
    device: str = "cpu",
    quantize: Mode | None = None,
) -> None:
    """Continue a prompt with a trained model (its UTF-8 bytes, or its ids in the model's tokenizer); prints the
    generated text, and a summary line on stderr.

    Args:
        ckpt: a .ckpt file, or a run directory (runs/NAME/version_N)
        prompt: the text to continue
        which: which checkpoint of a run directory
        tokenizer: the model's tokenizer file, when it moved since training
        max_new_tokens: tokens to generate at most
        temperature: 0: greedy
        top_k: sample among the k most likely tokens
        top_p: sample among the most likely tokens holding this probability
        seed: sampling seed
        allowed_bytes: only these bytes (and EOS) may be emitted (byte models only, as the next three)
        denied_bytes: these bytes may not be emitted
        facts: a file of fact strings (one per line): words must come from them or the function words
        regex: the generated text must match this pattern (see soma_lightning/generation/regex.py for the subset)
        repetition_penalty: divide the logits of tokens already in the sequence by this
        trace: write one JSON line per emitted token: probability, constraint decisions, provenance
        speculative: draft with the model's MTP heads, verify with the main head (greedy)
        no_cache: recompute the whole sequence for every token (the reference)
        cuda_graph: replay the cached one-token step as a CUDA graph; default: on CUDA for models that
            support it
        modality: image/audio: ask a model trained on a multimodal corpus for an image or clip of the prompt
            (a label or transcript)
        tokens_out: also write the prompt and generated ids as .npy (for `soma-lightning decode --tokens`)
        device: cpu, cuda or cuda:N
        quantize: int8 or int4: weight-only quantization of every Linear layer through torchao, on the device
            (soma_lightning/quantize.py)
    """
    check_device(device)
    processors = constraints(allowed_bytes, denied_bytes, facts, regex, repetition_penalty)
    module = load_module(ckpt, which, tokenizer=tokenizer)
    vocabulary = module.vocabulary
    byte_flags = {"allowed_bytes": allowed_bytes, "denied_bytes": denied_bytes, "facts": facts, "regex": regex}
    given = [name for name, value in byte_flags.items() if value is not None]
    if given and not vocabulary.is_bytes:
        raise UserError(f"--{given[0]}: constrains bytes, but {ckpt} emits the tokens of {vocabulary.tokenizer} (multi-byte pieces); drop it")
    ranges = module.arch.vocab_ranges
    if modality == "text":
        ids = vocabulary.encode(prompt)
    elif ranges is None:
        raise UserError(f"--modality: {modality} needs a model with a token space (model.arch.vocab_ranges); {ckpt} has none")
    else:
        ids = modality_prompt(TokenSpace(ranges), prompt, modality).tolist()
    model = module.model.to(device)
    if quantize is not None:
        quantize_weights(model, quantize)
    result = generate_tokens(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, processors,
        use_cache=not no_cache, trace=trace is not None, speculative=speculative, cuda_graph=cuda_graph, vocab_ranges=ranges,
        vocabulary=vocabulary,
    )
    if trace is not None:
        write_trace(trace, result.trace)
    if tokens_out is not None:
        everything = np.array(ids + result.tokens[0], dtype=np.int64)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, everything)

        atomic_write(Path(tokens_out), write)
    print(result.texts[0])
    summary = f"soma-lightning: {len(result.tokens[0])} tokens, stop: {result.stop_reasons[0]}, {result.forward_passes} forward passes"
    if speculative:
        summary += f", {result.accepted}/{result.drafted} drafts accepted"
    print(summary, file=sys.stderr)

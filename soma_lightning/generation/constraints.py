"""Decode-time constraints as composable logits processors.

A processor is called as `processor(tokens, prompt_length, logits) -> logits` with the sequence so far
(tokens [B, T], the first `prompt_length` the prompt) and the next-token logits [B, V] (float32); it
returns logits with disallowed ids at -inf (or otherwise reweighted). Processors run in the order given;
`generate` records, for every emitted token, what each one did (see sampling.py).

Text constraints (`FactVocabulary`, `RegexConstraint`) read the bytes generated so far (not the prompt);
EOS (data_modules/contract.py) ends the text and is allowed only where the text is complete.
"""

import torch
from torch import Tensor

from soma_lightning.data_modules.contract import EOS
from soma_lightning.errors import UserError
from soma_lightning.generation.regex import ByteRegex


class LogitsProcessor:
    """Base class: `name` appears in traces."""

    name = "processor"

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        raise NotImplementedError


def _check_ids(ids: list[int], what: str) -> list[int]:
    bad = [i for i in ids if not isinstance(i, int) or i < 0]
    if bad:
        raise UserError(f"{what}: token ids must be non-negative integers, got {bad[:5]}")
    return sorted(set(ids))


def _ids_tensor(ids: list[int], logits: Tensor, what: str) -> Tensor:
    if ids and ids[-1] >= logits.shape[-1]:
        raise UserError(f"{what}: token id {ids[-1]} is outside the vocabulary (size {logits.shape[-1]})")
    return torch.tensor(ids, dtype=torch.long, device=logits.device)


class AllowedTokens(LogitsProcessor):
    """Only these token ids may be emitted."""

    name = "allowed_tokens"

    def __init__(self, ids: list[int]) -> None:
        self.ids = _check_ids(list(ids), "allowed tokens")

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[_ids_tensor(self.ids, logits, "allowed tokens")] = True
        return logits.masked_fill(~keep, float("-inf"))


class DeniedTokens(LogitsProcessor):
    """These token ids may not be emitted."""

    name = "denied_tokens"

    def __init__(self, ids: list[int]) -> None:
        self.ids = _check_ids(list(ids), "denied tokens")

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        return logits.index_fill(-1, _ids_tensor(self.ids, logits, "denied tokens"), float("-inf"))


class RepetitionPenalty(LogitsProcessor):
    """CTRL's penalty, as transformers applies it: the logit of every id already in the sequence (prompt
    included) is divided by `penalty` where positive, multiplied where negative."""

    name = "repetition_penalty"

    def __init__(self, penalty: float) -> None:
        if not penalty > 0:
            raise UserError(f"repetition penalty: must be positive, got {penalty}")
        self.penalty = penalty

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        seen = logits.gather(-1, tokens)
        return logits.scatter(-1, tokens, torch.where(seen > 0, seen / self.penalty, seen * self.penalty))


class TextConstraint(LogitsProcessor):
    """A constraint on the generated text: subclasses say which bytes and whether EOS may come next."""

    def next_allowed(self, row: int, text: list[int]) -> list[bool]:
        """Per byte 0..255 and EOS (index 256): may it follow `text`, the ids generated so far in `row`?"""
        raise NotImplementedError

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        for row, text in enumerate(tokens[:, prompt_length:].tolist()):
            allowed = self.next_allowed(row, text)
            keep[row, :256] = torch.tensor(allowed[:256])
            keep[row, EOS] = allowed[256]
        return logits.masked_fill(~keep, float("-inf"))


FUNCTION_WORDS = (
    "a an the and or but nor if then else of to in on at by for with from as into onto about over under after "
    "before between through during up down out off is are was were be been being am it its this that these "
    "those he she they we you i his her their our your my me him them us not no so than there here which who "
    "whom whose what when where why how all any some each every has have had do does did will would shall "
    "should can could may might must also very more most such only same other"
).split()
WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'")


def _words(text: bytes) -> list[str]:
    words, current = [], []
    for b in text:
        if b in WORD_BYTES:
            current.append(chr(b))
        elif current:
            words.append("".join(current))
            current = []
    return words + (["".join(current)] if current else [])


class FactVocabulary(TextConstraint):
    """Words must come from the supplied facts or the function-word list (case-insensitive). A word is a
    run of ASCII letters, digits and apostrophes; any other byte (space, punctuation, newline, non-ASCII)
    and EOS may follow only a complete allowed word (or no word), and a word byte only where the word so far
    stays a prefix of an allowed word."""

    name = "fact_vocabulary"

    def __init__(self, facts: list[str], function_words: list[str] = FUNCTION_WORDS) -> None:
        words = set(function_words)
        for fact in facts:
            words.update(_words(fact.encode()))
        self.words = {w.lower() for w in words if w}
        if not self.words:
            raise UserError("facts: no words in the supplied facts and function words")
        self.prefixes = {w[:i] for w in self.words for i in range(len(w) + 1)}

    def allowed(self, text: list[int]) -> list[bool]:
        """Per id 0..255 and EOS (index 256): may it come next after `text` (bytes only)?"""
        end = len(text)
        while end and text[end - 1] in WORD_BYTES:
            end -= 1
        word = bytes(text[end:]).decode().lower()
        complete = word == "" or word in self.words
        out = []
        for b in range(256):
            if b in WORD_BYTES:
                out.append(word + chr(b).lower() in self.prefixes)
            else:
                out.append(complete)
        return out + [complete]

    def next_allowed(self, row: int, text: list[int]) -> list[bool]:
        if any(t > 255 for t in text):
            return [False] * 257  # the row has ended (EOS); nothing is allowed after it
        return self.allowed(text)


class RegexConstraint(TextConstraint):
    """The generated text must stay a prefix of a full match of `pattern` (regex.py: the supported subset),
    read over bytes; EOS only where the text is a full match."""

    name = "regex"

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.regex = ByteRegex(pattern)
        self._masks: dict[frozenset[int], list[bool]] = {}
        self._rows: dict[int, tuple[list[int], frozenset[int]]] = {}

    def states_after(self, text: list[int], row: int | None = None) -> frozenset[int]:
        """The automaton's states after reading `text` (cached per row, stepping on from the last call's
        text); empty after an id that is no byte (EOS)."""
        done, states = self._rows.get(row, ([], None)) if row is not None else ([], None)
        if states is None or text[: len(done)] != done:
            done, states = [], self.regex.start
        for b in text[len(done) :]:
            states = self.regex.step(states, b) if b < 256 else frozenset()
        if row is not None:
            self._rows[row] = (list(text), states)
        return states

    def allowed(self, states: frozenset[int]) -> list[bool]:
        """Per byte 0..255 and EOS (index 256)."""
        if states not in self._masks:
            viable = self.regex.viable(states)
            self._masks[states] = [bool(viable >> b & 1) for b in range(256)] + [self.regex.accepts(states)]
        return self._masks[states]

    def matches(self, text: bytes) -> bool:
        return self.regex.matches(text)

    def next_allowed(self, row: int, text: list[int]) -> list[bool]:
        return self.allowed(self.states_after(text, row))

"""Decode-time constraints as composable logits processors.

A processor is called as `processor(tokens, prompt_length, logits) -> logits` with the sequence so far
(tokens [B, T], the first `prompt_length` the prompt) and the next-token logits [B, V] (float32); it
returns logits with disallowed ids at -inf (or otherwise reweighted). Processors run in the order given;
`generate` records, for every emitted token, what each one did (see soma_lightning/generate.py).

Text constraints (`FactVocabulary`, `RegexConstraint`) read the bytes generated so far (not the prompt);
EOS (data_modules/contract.py) ends the text and is allowed only where the text is complete.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

from soma_lightning.data_modules.contract import EOS
from soma_lightning.errors import UserError


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


def _text_rows(tokens: Tensor, prompt_length: int) -> list[list[int]]:
    return tokens[:, prompt_length:].tolist()


FUNCTION_WORDS = (
    "a an the and or but nor if then else of to in on at by for with from as into onto about over under after "
    "before between through during up down out off is are was were be been being am it its this that these "
    "those he she they we you i his her their our your my me him them us not no so than there here which who "
    "whom whose what when where why how all any some each every has have had do does did will would shall "
    "should can could may might must also very more most such only same other"
).split()
WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'")


class FactVocabulary(LogitsProcessor):
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
        """Per id 0..255 and EOS (index 256): may it come next after `text`?"""
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

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        for row, text in enumerate(_text_rows(tokens, prompt_length)):
            if any(t > 255 for t in text):
                continue  # the row has ended (EOS); nothing is allowed after it
            allowed = self.allowed(text)
            keep[row, :256] = torch.tensor(allowed[:256])
            keep[row, EOS] = allowed[256]
        return logits.masked_fill(~keep, float("-inf"))


def _words(text: bytes) -> list[str]:
    words, current = [], []
    for b in text:
        if b in WORD_BYTES:
            current.append(chr(b))
        elif current:
            words.append("".join(current))
            current = []
    return words + (["".join(current)] if current else [])


# ---------------------------------------------------------------- regular expressions over bytes

ALL_BYTES = (1 << 256) - 1
_DIGITS = sum(1 << b for b in b"0123456789")
_WORD = sum(1 << b for b in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SPACE = sum(1 << b for b in b" \t\n\r\f\v")
_CLASS_ESCAPES = {"d": _DIGITS, "D": ALL_BYTES & ~_DIGITS, "w": _WORD, "W": ALL_BYTES & ~_WORD, "s": _SPACE, "S": ALL_BYTES & ~_SPACE}
_CHAR_ESCAPES = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "0": 0}
MAX_REPEAT = 1000


@dataclass
class _Nfa:
    """Thompson NFA over bytes: per state, epsilon moves and (byte set as a 256-bit mask, target) moves."""

    eps: list[list[int]] = field(default_factory=list)
    moves: list[list[tuple[int, int]]] = field(default_factory=list)

    def state(self) -> int:
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1


class _Parser:
    """Recursive descent over the supported subset; builds NFA fragments (start, end) directly."""

    def __init__(self, pattern: str, nfa: _Nfa) -> None:
        self.p, self.i, self.nfa = pattern, 0, nfa

    def error(self, what: str) -> UserError:
        return UserError(f"regex {self.p!r}: {what} at position {self.i} (supported: literals, ., [...] classes, \\d \\w \\s and their negations, (...), (?:...), |, * + ? {{m}} {{m,}} {{m,n}}, ^ and $ at the ends)")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        self.i += 1
        return self.p[self.i - 1]

    def alternation(self) -> tuple[int, int]:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.take()
            branches.append(self.sequence())
        if len(branches) == 1:
            return branches[0]
        start, end = self.nfa.state(), self.nfa.state()
        for s, e in branches:
            self.nfa.eps[start].append(s)
            self.nfa.eps[e].append(end)
        return start, end

    def sequence(self) -> tuple[int, int]:
        start = end = self.nfa.state()
        while self.peek() not in (None, "|", ")"):
            atom = self.quantified()
            self.nfa.eps[end].append(atom[0])
            end = atom[1]
        return start, end

    def quantified(self) -> tuple[int, int]:
        build = self.atom_builder()
        lo, hi = 1, 1
        c = self.peek()
        if c in ("*", "+", "?"):
            self.take()
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and self.counted(self.i):
            lo, hi, self.i = self.counted(self.i)
        if (lo, hi) != (1, 1) and self.peek() == "?":
            self.take()  # lazy: the same language
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.counted(self.i)):
            raise self.error("a quantifier after a quantifier")
        return self.repeat(build, lo, hi)

    def counted(self, i: int) -> tuple[int, int | None, int] | None:
        """A `{m}`, `{m,}` or `{m,n}` at i: (m, n or None, the index after it); None if there is none (then
        `{` is a literal, as in Python's re)."""
        j = self.p.find("}", i)
        parts = self.p[i + 1 : j].split(",") if j > i else []
        if not parts or len(parts) > 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1] and not parts[1].isdigit()):
            return None
        lo = int(parts[0])
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
        if (hi is not None and hi < lo) or max(lo, hi or 0) > MAX_REPEAT:
            raise self.error(f"bad repeat count {self.p[i : j + 1]} (need m <= n <= {MAX_REPEAT})")
        return lo, hi, j + 1

    def repeat(self, build, lo: int, hi: int | None) -> tuple[int, int]:
        start = end = self.nfa.state()
        for _ in range(lo):
            s, e = build()
            self.nfa.eps[end].append(s)
            end = e
        if hi is None:  # a loop: zero or more further copies
            s, e = build()
            self.nfa.eps[end].append(s)
            self.nfa.eps[e].append(s)
            self.nfa.eps[s].append(e)
            return start, e
        for _ in range(hi - lo):
            s, e = build()
            self.nfa.eps[end].append(s)
            self.nfa.eps[s].append(e)
            end = e
        return start, end

    def atom_builder(self):
        """Parse one atom; return a function building a fresh copy of its fragment (repeats need copies)."""
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("unsupported group syntax (lookaround, named groups, flags)")
            body_start = self.i
            self.alternation()  # parsed once to find the end (and errors); each repeat builds a fresh copy
            if self.peek() != ")":
                raise self.error("missing )")
            self.take()

            def build_group():
                sub = _Parser(self.p, self.nfa)
                sub.i = body_start
                return sub.alternation()

            return build_group
        if c == "{" and not self.counted(self.i - 1):
            return self._literal_builder(ord("{"))
        if c in ")*+?{":
            self.i -= 1
            raise self.error(f"nothing to repeat or unbalanced {c!r}")
        if c in "^$":
            at_end = self.i == len(self.p)
            if (c == "^" and self.i != 1) or (c == "$" and not at_end):
                self.i -= 1
                raise self.error(f"anchor {c!r} is only supported at the very {'start' if c == '^' else 'end'}")
            return lambda: (lambda s: (s, s))(self.nfa.state())
        if c == ".":
            return self._mask_builder(ALL_BYTES & ~(1 << 10))
        if c == "[":
            return self._mask_builder(self.char_class())
        if c == "\\":
            return self._mask_builder(self.escape())
        encoded = c.encode()
        if len(encoded) == 1:
            return self._literal_builder(encoded[0])
        return lambda: self._sequence_of(encoded)

    def _literal_builder(self, byte: int):
        return self._mask_builder(1 << byte)

    def _mask_builder(self, mask: int):
        def build():
            s, e = self.nfa.state(), self.nfa.state()
            self.nfa.moves[s].append((mask, e))
            return s, e

        return build

    def _sequence_of(self, data: bytes) -> tuple[int, int]:
        start = end = self.nfa.state()
        for b in data:
            nxt = self.nfa.state()
            self.nfa.moves[end].append((1 << b, nxt))
            end = nxt
        return start, end

    def escape(self) -> int:
        if self.peek() is None:
            raise self.error("a trailing backslash")
        c = self.take()
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c in _CHAR_ESCAPES:
            return 1 << _CHAR_ESCAPES[c]
        if c == "x":
            digits = self.p[self.i : self.i + 2]
            if len(digits) != 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error("\\x needs two hex digits")
            self.i += 2
            return 1 << int(digits, 16)
        if c.isalnum():
            self.i -= 2
            raise self.error(f"unsupported escape \\{c} (backreferences, \\b, \\A, \\Z and the like)")
        if len(c.encode()) != 1:
            raise self.error("non-ASCII escape")
        return 1 << ord(c)

    def char_class(self) -> int:
        negate = self.peek() == "^"
        if negate:
            self.take()
        mask, first = 0, True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("missing ]")
            if c == "]" and not first:
                self.take()
                break
            first = False
            lo = self._class_item()
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.take()
                hi = self._class_item()
                if lo.bit_count() != 1 or hi.bit_count() != 1 or hi < lo:
                    raise self.error("bad range in a character class")
                mask |= (hi << 1) - lo
            else:
                mask |= lo
        return ALL_BYTES & ~mask if negate else mask

    def _class_item(self) -> int:
        c = self.take()
        if c == "\\":
            return self.escape()
        if len(c.encode()) != 1:
            self.i -= 1
            raise self.error("non-ASCII character in a class")
        return 1 << ord(c)


class RegexConstraint(LogitsProcessor):
    """The generated text must stay a prefix of a full match of `pattern`, read over bytes (the pattern's
    non-ASCII characters as their UTF-8 bytes); EOS only where the text is a full match. The pattern
    compiles to a Thompson NFA; a byte is allowed when some NFA state reached after the text has a move on
    it to a state from which an accepting state is reachable (so a dead end is never entered), which is the
    exact prefix-viability test. Supported: literals, `.` (any byte but newline), classes `[a-z]`,
    `[^...]`, `\\d \\w \\s \\D \\W \\S`, `\\n \\t \\r \\f \\v \\0 \\xHH`, escaped metacharacters, groups
    `(...)` and `(?:...)`, `|`, quantifiers `* + ? {m} {m,} {m,n}` (lazy forms accepted: the same language),
    `^` / `$` only at the very start / end (every match is anchored anyway). Anything else
    (backreferences, lookaround, `\\b`, flags, named groups) is refused with a UserError."""

    name = "regex"

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.nfa = _Nfa()
        parser = _Parser(pattern, self.nfa)
        self.start, self.accept = parser.alternation()
        if parser.peek() is not None:
            raise parser.error("unbalanced )")
        self.live = self._co_reachable()
        self._masks: dict[frozenset[int], list[bool]] = {}
        self._rows: dict[int, tuple[list[int], frozenset[int]]] = {}

    def _co_reachable(self) -> set[int]:
        back: list[list[int]] = [[] for _ in self.nfa.eps]
        for s, targets in enumerate(self.nfa.eps):
            for t in targets:
                back[t].append(s)
        for s, moves in enumerate(self.nfa.moves):
            for mask, t in moves:
                if mask:
                    back[t].append(s)
        live, todo = {self.accept}, [self.accept]
        while todo:
            for s in back[todo.pop()]:
                if s not in live:
                    live.add(s)
                    todo.append(s)
        return live

    def _closure(self, states) -> frozenset[int]:
        todo = list(states)
        seen = set(todo)
        while todo:
            for t in self.nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _step(self, states: frozenset[int], byte: int) -> frozenset[int]:
        return self._closure(t for s in states for mask, t in self.nfa.moves[s] if mask >> byte & 1 and t in self.live)

    def states_after(self, text: list[int], row: int | None = None) -> frozenset[int]:
        """NFA states after reading `text` (cached per row, stepping on from the last call's text)."""
        done, states = self._rows.get(row, ([], None)) if row is not None else ([], None)
        if states is None or text[: len(done)] != done:
            done, states = [], self._closure([self.start])
        for b in text[len(done) :]:
            states = self._step(states, b) if b < 256 else frozenset()
        if row is not None:
            self._rows[row] = (list(text), states)
        return states

    def allowed(self, states: frozenset[int]) -> list[bool]:
        """Per byte 0..255 and EOS (index 256)."""
        if states not in self._masks:
            mask = 0
            for s in states:
                for m, t in self.nfa.moves[s]:
                    if t in self.live:
                        mask |= m
            self._masks[states] = [bool(mask >> b & 1) for b in range(256)] + [self.accept in states]
        return self._masks[states]

    def matches(self, text: bytes) -> bool:
        return self.accept in self.states_after(list(text))

    def __call__(self, tokens: Tensor, prompt_length: int, logits: Tensor) -> Tensor:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        for row, text in enumerate(_text_rows(tokens, prompt_length)):
            allowed = self.allowed(self.states_after(text, row))
            keep[row, :256] = torch.tensor(allowed[:256])
            keep[row, EOS] = allowed[256]
        return logits.masked_fill(~keep, float("-inf"))

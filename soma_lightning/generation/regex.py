"""Regular expressions over bytes, compiled to a Thompson NFA for prefix-viability tests.

`ByteRegex(pattern)` reads `pattern` over bytes (its non-ASCII characters as their UTF-8 bytes). A set of NFA
states stands for the text read so far; `viable(states)` is the set of bytes after which a full match is
still reachable. Only moves into states from which the accepting state is reachable are ever taken, so a
dead end is never entered and the test is exact.

Supported: literals, `.` (any byte but newline), classes `[a-z]`, `[^...]`, `\\d \\w \\s \\D \\W \\S`,
`\\n \\t \\r \\f \\v \\0 \\xHH`, escaped metacharacters, groups `(...)` and `(?:...)`, `|`, quantifiers
`* + ? {m} {m,} {m,n}` (lazy forms accepted: the same language), `^` / `$` only at the very start / end
(every match is anchored anyway). Anything else (backreferences, lookaround, `\\b`, flags, named groups) is
refused with a UserError.
"""

from dataclasses import dataclass, field
from typing import Callable, Iterable

from soma_lightning.errors import UserError

ALL_BYTES = (1 << 256) - 1
_DIGITS = sum(1 << b for b in b"0123456789")
_WORD = sum(1 << b for b in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SPACE = sum(1 << b for b in b" \t\n\r\f\v")
_CLASS_ESCAPES = {"d": _DIGITS, "D": ALL_BYTES & ~_DIGITS, "w": _WORD, "W": ALL_BYTES & ~_WORD, "s": _SPACE, "S": ALL_BYTES & ~_SPACE}
_CHAR_ESCAPES = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "0": 0}
MAX_REPEAT = 1000

Fragment = tuple[int, int]  # an NFA fragment: (start state, end state)


@dataclass
class _Nfa:
    """Per state, epsilon moves and (byte set as a 256-bit mask, target) moves."""

    eps: list[list[int]] = field(default_factory=list)
    moves: list[list[tuple[int, int]]] = field(default_factory=list)

    def state(self) -> int:
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1


class _Parser:
    """Recursive descent over the supported subset; builds NFA fragments directly."""

    def __init__(self, pattern: str, nfa: _Nfa) -> None:
        self.p, self.i, self.nfa = pattern, 0, nfa

    def error(self, what: str) -> UserError:
        return UserError(f"regex {self.p!r}: {what} at position {self.i} (supported: literals, ., [...] classes, \\d \\w \\s and their negations, (...), (?:...), |, * + ? {{m}} {{m,}} {{m,n}}, ^ and $ at the ends)")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        self.i += 1
        return self.p[self.i - 1]

    def alternation(self) -> Fragment:
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

    def sequence(self) -> Fragment:
        start = end = self.nfa.state()
        while self.peek() not in (None, "|", ")"):
            atom = self.quantified()
            self.nfa.eps[end].append(atom[0])
            end = atom[1]
        return start, end

    def quantified(self) -> Fragment:
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

    def repeat(self, build: Callable[[], Fragment], lo: int, hi: int | None) -> Fragment:
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

    def atom_builder(self) -> Callable[[], Fragment]:
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

            def build_group() -> Fragment:
                sub = _Parser(self.p, self.nfa)
                sub.i = body_start
                return sub.alternation()

            return build_group
        if c == "{" and not self.counted(self.i - 1):
            return self._mask_builder(1 << ord("{"))
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
            return self._mask_builder(1 << encoded[0])
        return lambda: self._sequence_of(encoded)

    def _mask_builder(self, mask: int) -> Callable[[], Fragment]:
        def build() -> Fragment:
            s, e = self.nfa.state(), self.nfa.state()
            self.nfa.moves[s].append((mask, e))
            return s, e

        return build

    def _sequence_of(self, data: bytes) -> Fragment:
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


class ByteRegex:
    """`pattern` compiled; states are frozensets of NFA states, from `start` on, stepped byte by byte."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.nfa = _Nfa()
        parser = _Parser(pattern, self.nfa)
        initial, self.accept = parser.alternation()
        if parser.peek() is not None:
            raise parser.error("unbalanced )")
        self.live = self._co_reachable()
        self.start = self._closure([initial])

    def _co_reachable(self) -> set[int]:
        """The states from which the accepting state is reachable."""
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

    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        todo = list(states)
        seen = set(todo)
        while todo:
            for t in self.nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def step(self, states: frozenset[int], byte: int) -> frozenset[int]:
        return self._closure(t for s in states for mask, t in self.nfa.moves[s] if mask >> byte & 1 and t in self.live)

    def viable(self, states: frozenset[int]) -> int:
        """The bytes (a 256-bit mask) after which a full match is still reachable from `states`."""
        mask = 0
        for s in states:
            for m, t in self.nfa.moves[s]:
                if t in self.live:
                    mask |= m
        return mask

    def accepts(self, states: frozenset[int]) -> bool:
        return self.accept in states

    def matches(self, text: bytes) -> bool:
        states = self.start
        for b in text:
            states = self.step(states, b)
        return self.accepts(states)

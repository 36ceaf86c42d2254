"""Per-token tree structure of bytes, computed causally in one pass: the enclosing spans of each byte.

Spans nest as: paragraph (text after a blank line) > line (a deeper-indented line nests inside the last
shallower one; brackets stay open across lines) > bracket group ( ( [ { ) > word (a run of letters, digits,
underscores). A byte's ancestors are the spans open when it is read, outermost first, each named by the
position where it starts; the structure of position t depends only on bytes 0..t. Ids past the bytes (EOS,
PAD) end the paragraph, as a blank line does.
"""

import numpy as np
import torch
from torch import Tensor

OPEN, CLOSE, INDENT, BLANK = frozenset(b"([{"), frozenset(b")]}"), frozenset(b" \t"), frozenset(b" \t\r")
WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
NEWLINE = 10


class StructureScanner:
    """The one-pass scan behind `byte_structure`, a byte at a time: `push(b)` returns the enclosing span
    starts of the next position (so generation can extend a sequence's structure without rescanning it)."""

    def __init__(self, max_depth: int = 8) -> None:
        self.max_depth = max_depth
        self.position = 0
        self.stack: list[tuple[str, int, int]] = [("paragraph", 0, -1)]  # (kind, start, indent)
        self.line_start, self.indent, self.line_blank, self.prev_blank = True, 0, True, False

    def push(self, b: int) -> list[int]:
        i, stack = self.position, self.stack
        self.position += 1
        if stack[-1][0] == "word" and b not in WORD:
            stack.pop()
        if self.line_start and b in INDENT:
            self.indent += 4 if b == 9 else 1
        elif self.line_start and b != NEWLINE and b < 256:  # the first visible byte of a line
            self.line_start = False
            if self.prev_blank:
                stack[:] = [("paragraph", i, -1)]
            while stack[-1][0] == "line" and stack[-1][2] >= self.indent:
                stack.pop()
            stack.append(("line", i, self.indent))
        if b in WORD and stack[-1][0] != "word":
            stack.append(("word", i, -1))
        elif b in OPEN:
            stack.append(("bracket", i, -1))
        depth = min(len(stack), self.max_depth)
        row = [s[1] for s in stack[:depth]] + [-1] * (self.max_depth - depth)
        if b in CLOSE:
            while len(stack) > 1 and stack[-1][0] != "bracket":
                stack.pop()
            if stack[-1][0] == "bracket":
                stack.pop()
        if b >= 256:
            self.prev_blank, self.line_start, self.indent, self.line_blank = True, True, 0, True
        elif b == NEWLINE:
            self.prev_blank, self.line_start, self.indent, self.line_blank = self.line_blank, True, 0, True
            while stack[-1][0] in ("word", "line") and len(stack) > 1:
                if stack[-1][0] == "line" and not any(k == "bracket" for k, _, _ in stack):
                    break
                stack.pop()
        elif b not in BLANK:
            self.line_blank = False
        return row


def byte_structure(tokens: list[int] | bytes, max_depth: int = 8) -> np.ndarray:
    """[T, max_depth] int32: start positions of the enclosing spans, outermost first, -1 past the depth
    (spans deeper than max_depth are left out)."""
    scanner = StructureScanner(max_depth)
    return np.array([scanner.push(b) for b in tokens], dtype=np.int32).reshape(len(tokens), max_depth)


def batch_structure(tokens: Tensor, max_depth: int = 8) -> Tensor:
    """byte_structure of each row of [B, T] -> [B, T, max_depth] int64."""
    return torch.from_numpy(np.stack([byte_structure(row, max_depth) for row in tokens.tolist()])).long()


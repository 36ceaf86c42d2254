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


def byte_structure(tokens: list[int] | bytes, max_depth: int = 8) -> np.ndarray:
    """[T, max_depth] int32: start positions of the enclosing spans, outermost first, -1 past the depth
    (spans deeper than max_depth are left out)."""
    out = np.full((len(tokens), max_depth), -1, dtype=np.int32)
    stack: list[tuple[str, int, int]] = [("paragraph", 0, -1)]  # (kind, start, indent)
    line_start, indent, line_blank, prev_blank = True, 0, True, False
    for i, b in enumerate(tokens):
        if stack[-1][0] == "word" and b not in WORD:
            stack.pop()
        if line_start and b in INDENT:
            indent += 4 if b == 9 else 1
        elif line_start and b != NEWLINE and b < 256:  # the first visible byte of a line
            line_start = False
            if prev_blank:
                stack = [("paragraph", i, -1)]
            while stack[-1][0] == "line" and stack[-1][2] >= indent:
                stack.pop()
            stack.append(("line", i, indent))
        if b in WORD and stack[-1][0] != "word":
            stack.append(("word", i, -1))
        elif b in OPEN:
            stack.append(("bracket", i, -1))
        depth = min(len(stack), max_depth)
        out[i, :depth] = [s[1] for s in stack[:depth]]
        if b in CLOSE:
            while len(stack) > 1 and stack[-1][0] != "bracket":
                stack.pop()
            if stack[-1][0] == "bracket":
                stack.pop()
        if b >= 256:
            prev_blank, line_start, indent, line_blank = True, True, 0, True
        elif b == NEWLINE:
            prev_blank, line_start, indent, line_blank = line_blank, True, 0, True
            while stack[-1][0] in ("word", "line") and len(stack) > 1:
                if stack[-1][0] == "line" and not any(k == "bracket" for k, _, _ in stack):
                    break
                stack.pop()
        elif b not in BLANK:
            line_blank = False
    return out


def batch_structure(tokens: Tensor, max_depth: int = 8) -> Tensor:
    """byte_structure of each row of [B, T] -> [B, T, max_depth] int64."""
    return torch.from_numpy(np.stack([byte_structure(row, max_depth) for row in tokens.tolist()])).long()


"""Per-token provenance traces: for every emitted token its probability, what each logits processor did, and
where the last attention layer looked (for SOSM also the query's semantic-graph edges); written as JSON
lines. A token is shown as its byte (`"byte"`) or, for a tokenizer's id, its text piece (`"piece"`)."""

import json
from pathlib import Path

from torch import Tensor, nn

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.semantic_graph import EDGE_TYPES
from soma_lightning.vocabulary import Vocabulary

TOP_POSITIONS = 5  # prompt positions listed per emitted token
Stage = tuple[str, Tensor, Tensor]  # a processor's name and the logits [B, V] before and after it
Layer = tuple[str, nn.Module]


def attention_layer(model: SomaModel, state: DecodeState) -> Layer | None:
    """The last mixer of the main layers that recorded its attention weights in `state` during a pass with
    `record_attention` (softmax attention does): the one whose weights a trace reports."""
    found = [(name, m) for name, m in model.encoder.named_modules() if m in state.attention]
    return (f"encoder.{found[-1][0]}", found[-1][1]) if found else None


def _finite(x: Tensor) -> float | None:
    """A logit for JSON: None for -inf (a masked id)."""
    return float(x) if x.isfinite() else None


def _shown(vocabulary: Vocabulary, t: int) -> dict[str, str]:
    """Token `t` for a reader: its byte (latin-1), or the tokenizer's text of it alone; EOS and other ids
    outside the vocabulary in angle brackets."""
    if t == vocabulary.eos:
        text = "<EOS>"
    elif not 0 <= t < vocabulary.size:
        text = f"<{t}>"
    elif vocabulary.is_bytes:
        text = bytes([t]).decode("latin-1")
    else:
        text = vocabulary.decode([t])
    return {"byte" if vocabulary.is_bytes else "piece": text}


def _provenance(state: DecodeState, layer: Layer | None, row: int, tokens: Tensor, prompt_length: int, vocabulary: Vocabulary) -> dict:
    """The attention (mean over heads) of the newest query of `row` in the last attention layer: its top
    prompt positions; for SOSM also the query's graph edges."""
    out: dict = {}
    weights = state.attention[layer[1]][row, :, -1].mean(dim=0) if layer is not None and layer[1] in state.attention else None  # [T]
    if weights is not None:
        top = weights[:prompt_length].topk(min(TOP_POSITIONS, prompt_length))
        out["attention"] = {
            "layer": layer[0],
            "heads": "mean",
            "top_prompt_positions": [
                {"position": j, **_shown(vocabulary, int(tokens[row, j])), "weight": round(w, 6)} for w, j in zip(top.values.tolist(), top.indices.tolist())
            ],
        }
    if state.graph is not None:
        edges = []
        for j, kind in zip(state.graph.neighbors[row, -1].tolist(), state.graph.edge_type[row, -1].tolist()):
            if j >= 0:
                edge = {"position": j, **_shown(vocabulary, int(tokens[row, j])), "type": EDGE_TYPES[kind]}
                if weights is not None:
                    edge["weight"] = round(float(weights[j]), 6)
                edges.append(edge)
        out["graph_edges"] = edges
    return out


def token_record(
    row: int, step: int, token: int, tokens: Tensor, prompt_length: int, model_probs: Tensor, sampled: Tensor,
    stages: list[Stage], state: DecodeState, layer: Layer | None, vocabulary: Vocabulary,
) -> dict:
    """The trace record of `token`, emitted in `row` at `step` after `tokens` [B, T]: its probability under
    the model (`model_probs`) and under the distribution it was drawn from (`sampled`), each processor's
    decision, and its provenance; tokens shown as `vocabulary` reads them."""
    return {
        "row": row,
        "step": step,
        "position": tokens.shape[1],
        "token": token,
        **_shown(vocabulary, token),
        "probability": round(float(model_probs[row, token]), 6),
        "sampling_probability": round(float(sampled[row, token]), 6),
        "constraints": [
            {"name": name, "allowed": int(after[row].isfinite().sum()), "logit_before": _finite(before[row, token]), "logit_after": _finite(after[row, token])}
            for name, before, after in stages
        ],
    } | _provenance(state, layer, row, tokens, prompt_length, vocabulary)


def write_trace(path: str | Path, records: list[dict]) -> None:
    """The trace as JSON lines, written atomically."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))

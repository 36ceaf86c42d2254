"""`soma-lightning graph`: the semantic graph a SOSM model builds for a text."""

from json import dumps
from pathlib import Path
from typing import Literal

import torch

from soma_lightning.checkpoints import load_module, resolve_checkpoint
from soma_lightning.decomposition import next_token_attribution
from soma_lightning.errors import UserError
from soma_lightning.nn.semantic_graph import EDGE_TYPES, build_graph
from soma_lightning.nn.semantic_state import SemanticStateEmbedding


def semantic_graph_of(ckpt: str, text: str, which: str = "last", attribution: bool = False) -> dict:
    """The semantic graph a SOSM checkpoint builds for the bytes of `text`: for each position its edges (key
    position, byte, edge type) and, for semantic edges, each block's weighted cosine in the similarity; with
    `attribution`, the decomposition of its next-byte prediction (soma_lightning/decomposition.py)."""
    path = resolve_checkpoint(ckpt, which)
    model = load_module(path).model.eval()
    embedding = model.embedding
    if not isinstance(embedding, SemanticStateEmbedding):
        raise UserError(f"--ckpt: {path} is not a SOSM model (its token embedding is {type(embedding).__name__}, not semantic_state)")
    data = text.encode()
    if not data:
        raise UserError("--text: expected some text, got an empty string")
    with torch.no_grad():
        _, mu = embedding.embed(torch.tensor([list(data)]))
        graph = build_graph(mu, embedding.graph)
    blocks = list(embedding.graph.blocks)
    char = lambda i: data[i : i + 1].decode("latin-1")  # noqa: E731
    positions = []
    for i in range(len(data)):
        edges = []
        for j, kind, shares in zip(graph.neighbors[0, i].tolist(), graph.edge_type[0, i].tolist(), graph.provenance[0, i].tolist()):
            if j < 0:
                continue
            edge = {"key": j, "byte": char(j), "type": EDGE_TYPES[kind]}
            if EDGE_TYPES[kind] == "semantic":
                edge["blocks"] = {b: round(s, 4) for b, s in zip(blocks, shares)}
            edges.append(edge)
        positions.append({"position": i, "byte": char(i), "edges": edges})
    if attribution:
        for p, a in zip(positions, next_token_attribution(model, torch.tensor([list(data)]))):
            p["attribution"] = a | {"target": bytes([a["target"]]).decode("latin-1") if a["target"] < 256 else a["target"]}
    return {"ckpt": str(path), "blocks": blocks, "positions": positions}


def graph(ckpt: str, text: str, which: Literal["best", "last"] = "last", json: str | None = None, attribution: bool = False) -> None:
    """The semantic graph a SOSM model builds for a text: per position its edges (key position, byte, edge
    type) and, for semantic edges, each block's weighted cosine in the similarity; with --attribution, how
    much each MU block and each edge type adds to the logit of the next byte.

    Args:
        ckpt: a .ckpt file, or a run directory (runs/NAME/version_N)
        text: the text whose graph to show
        which: which checkpoint of a run directory
        json: write the graph as JSON to this file instead of printing it
        attribution: add each position's next-byte attribution (DePass decomposition: docs/sosm.md)
    """
    info = semantic_graph_of(ckpt, text, which, attribution)
    if json:
        Path(json).write_text(dumps(info, indent=1))
        return
    for p in info["positions"]:
        edges = [
            f"{e['key']} {e['byte']!r} {e['type']}" + (" (" + " ".join(f"{b} {s:+.2f}" for b, s in e["blocks"].items()) + ")" if "blocks" in e else "")
            for e in p["edges"]
        ]
        print(f"{p['position']:5d} {p['byte']!r:>6} <- " + "; ".join(edges))
        if "attribution" in p:
            a = p["attribution"]
            top = sorted(a["sources"].items(), key=lambda kv: -abs(kv[1]))[:4]
            print(f"{'':13}-> {a['target']!r} {a['logit']:+.2f}: " + " ".join(f"{k} {v:+.2f}" for k, v in top)
                  + " | " + " ".join(f"{k} {v:+.2f}" for k, v in a["edge_types"].items()))

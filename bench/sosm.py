"""SOSM speed on one GPU, side by side in one run; prints a table and writes JSON.

    python bench/sosm.py --out sosm.json

For sequence lengths 512 to 8K (batch 4, d_model 1024, 8 heads, MU 64, sosm.yaml's graph settings): the
graph build time, and the graph attention layer forward+backward as edge-list gather, as a FlexAttention
block-sparse mask (mask built once per forward, included) and as dense masked attention (the reference,
while it fits), plus the graph builder's peak memory. `--device cpu --lengths 128,256` is a smoke run.
"""

import argparse
import json

import torch
import yaml

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.semantic_graph import GraphConfig, build_graph

from timing import timed_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="sosm.json")
    args = p.parse_args()
    device = torch.device(args.device)
    graph_cfg = GraphConfig(**yaml.safe_load(open("specs/sosm.yaml"))["model"]["arch"]["token_embedding"]["graph"])
    impls = ("gather", "flex", "reference") if device.type == "cuda" else ("gather", "reference")
    rows = []
    for t in (int(x) for x in args.lengths.split(",")):
        torch.manual_seed(0)
        state = torch.randn(args.batch, t, 64, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        row = {"seq_len": t, "build_ms": timed_ms(lambda: build_graph(state, graph_cfg), args.steps, warmup=2, device=device)}
        if device.type == "cuda":
            row["build_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        graph = build_graph(state, graph_cfg)
        row["edges_per_token"] = (graph.neighbors >= 0).float().sum(-1).mean().item()
        x = torch.randn(args.batch, t, 1024, device=device, requires_grad=True)
        positions = torch.arange(t, device=device).expand(args.batch, -1)
        for impl in impls:
            layer = GraphAttention(1024, num_heads=8, impl=impl).to(device)

            def step():
                ctx = SequenceContext(positions=positions, semantic_graph=graph)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    y = layer(x, ctx)
                y.float().square().mean().backward()

            try:
                row[f"{impl}_ms"] = timed_ms(step, args.steps, warmup=2, device=device)
            except torch.OutOfMemoryError:
                row[f"{impl}_ms"] = None
                torch.cuda.empty_cache()
            except Exception as e:  # a kernel that fails to compile: report it, measure the others
                row[f"{impl}_ms"] = None
                row[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[-1][:200]}"
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    json.dump({"device": str(device), "batch": args.batch, "graph": vars(graph_cfg), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

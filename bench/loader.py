"""Tokens per second the multimodal shard loader (MultimodalCorpus's train dataloader: mixture sampling from
memory-mapped shards, int64 batches with targets, positions and doc_ids) delivers on this machine, against
what one H100 consumes training specs/gpt5_moe.yaml (docs/benchmarks.md, "Whole model").

    python bench/loader.py --config specs/gpt5_moe_multimodal.yaml --shards runs/gpt5_moe_multimodal_data --out loader.json
    python bench/loader.py --small          # the tiny spec on the shipped samples, a quick check

Prepares the shards first when --shards holds none. Batches have the spec's seq_len and batch_size (8192 x 4
for gpt5_moe_multimodal.yaml, the shape gpt5_moe.yaml trains with). Prints a table and writes JSON.
"""

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from soma_lightning.cli.prepare import multimodal_corpus, prepare_from_spec
from soma_lightning.data_modules.multimodal import MultimodalCorpus
from soma_lightning.data_modules.shards import INDEX

H100_GPT5_MOE_TOKENS_PER_S = 50_789  # docs/benchmarks.md: specs/gpt5_moe.yaml, 4 x 8192 tokens, bf16, one H100


def tokens_per_s(data: MultimodalCorpus, batches: int, warmup: int = 2) -> float:
    it = iter(data.train_dataloader())
    for _ in range(warmup):  # worker start-up and first page-ins are not the steady state
        next(it)
    start = time.perf_counter()
    n = sum(next(it)["tokens"].numel() for _ in range(batches))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="specs/gpt5_moe_multimodal.yaml")
    parser.add_argument("--shards", default=None, help="prepared directory (default: the spec's data.init_args.path)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader num_workers values to compare")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--small", action="store_true", help="specs/gpt5_moe_multimodal_tiny.yaml, 20 batches")
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args()
    if args.small:
        args.config, args.batches = "specs/gpt5_moe_multimodal_tiny.yaml", 20
    shards = args.shards or yaml.safe_load(open(args.config))["data"]["init_args"]["path"]
    if not (Path(shards) / INDEX).is_file():
        prepare_from_spec(args.config, shards)
    rows = []
    print(f"{'workers':>7} {'batch':>10} {'tokens/s':>12} {'x H100 gpt5_moe':>16}")
    for workers in (int(w) for w in args.workers.split(",")):
        data = multimodal_corpus(args.config, path=shards, num_workers=workers)
        data.setup("fit")
        rate = tokens_per_s(data, args.batches)
        rows.append({"workers": workers, "batch_size": data.batch_size, "seq_len": data.seq_len, "batches": args.batches,
                     "tokens_per_s": rate, "headroom_vs_h100_gpt5_moe": rate / H100_GPT5_MOE_TOKENS_PER_S})
        print(f"{workers:>7} {f'{data.batch_size}x{data.seq_len}':>10} {rate:>12,.0f} {rate / H100_GPT5_MOE_TOKENS_PER_S:>15.1f}x")
    result = {"config": args.config, "shards": shards, "cpus": os.cpu_count(), "h100_gpt5_moe_tokens_per_s": H100_GPT5_MOE_TOKENS_PER_S, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

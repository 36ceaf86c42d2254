"""Scoring speed and bf16 drift of the full V1 model, side by side in one run.

    python bench/score.py --data soma_lightning/corpora/tinyshakespeare.txt --out score.json

Writes random-initialised full-size V1 weights (1.21 B parameters) as canonical safetensors, loads them
back through `model_from_canonical`, and scores the data as the canonical scorer does in float32 and under
bf16 autocast, with the plain-softmax reference attention and with SDPA. Prints bytes/s and the relative
error of loss and embedding against float32 + reference attention.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from soma_lightning import build_model
from soma_lightning.onchain import score
from soma_lightning.v1 import model_from_canonical, save_canonical, v1_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="soma_lightning/corpora/tinyshakespeare.txt")
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--out", default="score.json")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    torch.backends.cudnn.allow_tf32 = False
    data = Path(args.data).read_bytes()[: args.max_bytes]
    torch.manual_seed(0)
    weights = Path(tempfile.mkdtemp()) / "v1.safetensors"
    save_canonical(build_model(v1_spec(2048, 24, 8192), device="cuda"), weights)
    torch.cuda.empty_cache()
    rows, baseline = [], None
    for dtype, attention in ((None, "reference"), (None, "sdpa"), (torch.bfloat16, "sdpa"), (torch.bfloat16, "reference")):
        model = model_from_canonical(weights, device="cuda", attention=attention)
        score(model, data[:16 * 1024], autocast_dtype=dtype)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        result, embedding = score(model, data, autocast_dtype=dtype)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        baseline = baseline or (result, embedding)
        rows.append({
            "precision": "float32" if dtype is None else "bf16 autocast", "attention": attention, "seconds": seconds,
            "bytes_per_s": len(data) / seconds, "loss": result.loss, "ce": result.ce, "sigreg": result.sigreg,
            "loss_rel_err": abs(result.loss - baseline[0].loss) / abs(baseline[0].loss),
            "embedding_rel_err": float((embedding - baseline[1]).norm() / baseline[1].norm()),
        })
        del model
        torch.cuda.empty_cache()
    print(f"{len(data):,} bytes, {rows[0]['loss']:.6f} float32 loss, {torch.cuda.get_device_name()}")
    print(f"{'precision':14} {'attention':10} {'bytes/s':>10} {'loss':>12} {'loss rel err':>13} {'emb rel err':>12}")
    for r in rows:
        print(f"{r['precision']:14} {r['attention']:10} {r['bytes_per_s']:10.0f} {r['loss']:12.6f} {r['loss_rel_err']:13.2e} {r['embedding_rel_err']:12.2e}")
    json.dump({"data": args.data, "bytes": len(data), "device": torch.cuda.get_device_name(), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

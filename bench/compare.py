"""Training throughput of a spec on one GPU, side by side: soma-lightning's Trainer vs a plain PyTorch loop
over the same model and objective.

    python bench/throughput.py --config specs/soma_v1.yaml --steps 30 --batch-size 8 --out throughput.json

Prints a table (tokens/s, TFLOP/s, MFU against the GPU's dense bf16 peak, peak memory) and writes JSON.
FLOPs per token are the spec's analytic count (soma_lightning.measure), 3x the forward matrix FLOPs.
"""

import argparse
import json
import math
import time

import lightning as L
import torch
import torch.nn.functional as F

from soma_lightning import build_model, load_spec
from soma_lightning.callbacks.throughput import device_peak_flops
from soma_lightning.data_modules import PAD, ByteCorpus
from soma_lightning.lm import SomaLM
from soma_lightning.measure import train_flops_per_token
from soma_lightning.nn.sigreg import sigreg_statistic


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def lightning_run(spec, data: ByteCorpus, steps: int, precision: str) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(SomaLM(spec), datamodule=data)
    return timer.times


def plain_run(spec, data: ByteCorpus, steps: int) -> list[float]:
    """The same model, objective and AdamW in a bare loop under bf16 autocast."""
    model = build_model(spec, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    times = []
    for step, batch in zip(range(steps), data.train_dataloader()):
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reps = model.encode(batch["tokens"], batch["positions"])
            logits = model.predict(reps)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=PAD)
        noise = torch.randn(spec.d_model, 256, generator=g).cuda()
        loss = ce + 0.02 * sigreg_statistic(reps, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times


def summarize(name: str, times: list[float], tokens_per_step: int, flops_per_token: float, peak: float | None, warmup: int) -> dict:
    timed = times[warmup:]
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    tps = tokens_per_step / seconds
    return {
        "run": name, "step_s": seconds, "tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12,
        "mfu": tps * flops_per_token / peak if peak else math.nan,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="specs/soma_v1.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--out", default="throughput.json")
    args = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    spec = load_spec(args.config)
    data = ByteCorpus(seq_len=args.seq_len, batch_size=args.batch_size)
    data.setup("fit")
    tokens_per_step = args.batch_size * args.seq_len
    peak = device_peak_flops(torch.device("cuda"))
    flops = train_flops_per_token(build_model(spec, device="meta"), args.seq_len)
    rows = []
    for name, run in (("plain PyTorch loop", lambda: plain_run(spec, data, args.steps)), ("soma-lightning Trainer", lambda: lightning_run(spec, data, args.steps, args.precision))):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows.append(summarize(name, run(), tokens_per_step, flops, peak, args.warmup))
    result = {"config": args.config, "device": torch.cuda.get_device_name(), "batch_size": args.batch_size, "seq_len": args.seq_len,
              "precision": args.precision, "steps": args.steps, "warmup": args.warmup, "train_flops_per_token": flops, "peak_flops": peak, "rows": rows}
    print(f"{'run':26} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['run']:26} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {r['mfu']:6.1%} {r['peak_mem_gib']:9.1f}")
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

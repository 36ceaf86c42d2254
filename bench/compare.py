"""Training throughput of one spec on one GPU, side by side in one run: soma-lightning's Trainer path, a plain
PyTorch loop over the same nn.Module and objective, and (for V1-shaped specs) litgpt's GPT with the
equivalent config.

    python bench/compare.py --config specs/soma_v1.yaml --batch-size 16 --compile --out compare.json

All runs: the same batches of tiny-Shakespeare windows, bf16 autocast, fused AdamW, the same compile setting
(`--compile`: ours compiles each block, as `--model.compile true` does; litgpt's GPT is compiled whole, as
its pretrain script does). Dropout is set to `--dropout` everywhere (litgpt's GPT has none). Prints a table
(tokens/s, TFLOP/s, MFU against the GPU's dense bf16 peak, peak memory) and writes JSON. FLOPs per token:
the spec's analytic count (soma_lightning.measure), and the 6N + 12*L*D*T convention for comparison with
published MFU figures. `--runs trainer_float8` is the Trainer path with `--model.float8 true` (torchao's
float8 Linear layers; needs the float8 extra and an H100). Our runs try attention kernels in the order
`soma-lightning fit` sets (SDPA_PRIORITY: cuDNN first); `trainer_flash` is the Trainer with torch's default
order (flash first), and litgpt keeps torch's default. `trainer_eager` is the Trainer path without compile
whatever `--compile` says, for compiled against eager side by side. Every run starts from seed 0 (the same
initial weights for ours and the same batches for all); each row records the seconds from the run's start to
its first step (model build, and compilation when compiled). `--losses` records each Trainer step's loss
(this syncs every step, as the timer already does) and prints the mean of the last 50.

    python bench/compare.py --config specs/gpt5_moe.yaml --batch-size 4 --seq-len 8192 --compile --runs trainer,trainer_eager
    python bench/compare.py --config specs/soma_v1.yaml --batch-size 8 --compile --steps 500 --warmup 8 --runs trainer,trainer_float8 --losses
"""

import argparse
import json
import yaml
import math
import time
from dataclasses import replace
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from soma_lightning import build_model, load_spec
from soma_lightning.callbacks.throughput import device_peak_flops
from soma_lightning.data_modules import PAD, ByteCorpus
from soma_lightning.lm import SomaLM
from soma_lightning.measure import count_parameters, train_flops_per_token
from soma_lightning.nn.ops.attention.backends import SDPA_PRIORITY
from soma_lightning.nn.sigreg import SIGRegConfig, sigreg_statistic
from soma_lightning.spec import ModelSpec

from timing import PROFILED_STEPS, kernel_profile


Run = tuple[list[float], torch.profiler.profile | None]  # step end times; the profiler of the profiled steps


class StepTimer(L.Callback):
    def __init__(self, losses: list[float] | None = None) -> None:
        self.times: list[float] = []
        self.losses = losses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.losses is not None:
            self.losses.append(outputs["loss"].item())


def one_gpu_trainer(steps: int, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A Trainer for `steps` bf16-mixed training steps on one GPU, without validation, logger, checkpoints,
    progress bar or model summary."""
    return L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def lightning_run(
    spec, data: ByteCorpus, steps: int, compile: bool, profile: bool = False, float8: bool = False, losses: list[float] | None = None
) -> Run:
    """The Trainer path (not profiled: the plain loop runs the same module); `float8` as `--model.float8 true`;
    each step's loss appended to `losses` when given."""
    timer = StepTimer(losses)
    one_gpu_trainer(steps, [timer]).fit(SomaLM(spec, compile=compile, float8=float8), datamodule=data)
    return timer.times, None


def eager_run(spec, data: ByteCorpus, steps: int, compile: bool, **options) -> Run:
    """The Trainer path uncompiled, whatever `--compile` says."""
    return lightning_run(spec, data, steps, False, **options)


def _loop(model: torch.nn.Module, loss_of, data: ByteCorpus, steps: int, profile: bool = False) -> Run:
    """A bare training loop: bf16 autocast forward, float32 loss, backward, fused AdamW. With `profile`,
    PROFILED_STEPS more steps run under torch.profiler after the timed ones."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    times = []

    def step(i: int, batch: dict) -> None:
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        loss = loss_of(model, batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    batches = iter(data.train_dataloader())
    for i in range(steps):
        step(i, next(batches))
        times.append(time.perf_counter())
    if not profile:
        return times, None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for i in range(steps, steps + PROFILED_STEPS):
            step(i, next(batches))
    return times, profiler


def plain_run(spec, data: ByteCorpus, steps: int, compile: bool, profile: bool = False) -> Run:
    """The same model and objective (CE + SIGReg) as SomaLM, compiled the same way."""
    model = build_model(spec, device="cuda")
    if compile:
        for layer in model.encoder.layers:
            layer.compile()
    sigreg = SIGRegConfig()

    def loss_of(model, batch, step):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reps = model.encode(batch["tokens"], batch["positions"])
            logits = model.predict(reps)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=PAD)
        noise = torch.randn(spec.d_model, sigreg.slices, generator=torch.Generator().manual_seed(step)).cuda()
        return ce + sigreg.coefficient * sigreg_statistic(reps, noise, sigreg.t_max, sigreg.points, compiled=compile)

    return _loop(model, loss_of, data, steps, profile)


def litgpt_config(spec):
    """litgpt's Config for a V1-shaped spec: pre-norm LayerNorm, RoPE on the whole head, GELU MLP with biases,
    sequential residual, untied predictor with bias, multi-head attention."""
    from litgpt.config import Config

    layer = spec.blocks[next(iter(spec.blocks))]
    mixer, ffn = layer[0]["mixer"], layer[1]["ffn"]
    return Config(
        name="soma-v1", block_size=spec.max_seq_len, vocab_size=spec.vocab_size, padded_vocab_size=spec.vocab_size,
        n_layer=spec.n_layers, n_embd=spec.d_model, n_head=mixer["num_heads"], n_query_groups=mixer["num_heads"],
        rotary_percentage=1.0, parallel_residual=False, bias=True, attn_bias=True, lm_head_bias=spec.predictor_bias,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=ffn["hidden_dim"], gelu_approximate="none",
    )


def litgpt_run(spec, data: ByteCorpus, steps: int, compile: bool, profile: bool = False) -> Run:
    """litgpt's GPT (cross-entropy only, as its pretraining), compiled whole when `compile`."""
    from litgpt.model import GPT

    config = litgpt_config(spec)
    with torch.device("cuda"):
        model = GPT(config)
    model.max_seq_length = spec.max_seq_len
    print(f"litgpt GPT: {sum(p.numel() for p in model.parameters()):,} parameters")
    forward = torch.compile(model) if compile else model

    def loss_of(model, batch, step):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(batch["tokens"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=PAD)

    return _loop(model, loss_of, data, steps, profile)


def sdpa_order(run, order: list[SDPBackend]):
    """`run` with scaled_dot_product_attention trying its kernels in `order`."""

    def wrapped(*args, **kwargs) -> Run:
        with sdpa_kernel(order, set_priority=True):
            return run(*args, **kwargs)

    return wrapped


TORCH_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]  # torch's default

RUNS = {
    "trainer": ("soma-lightning Trainer", sdpa_order(lightning_run, SDPA_PRIORITY)),
    "trainer_flash": ("Trainer, torch's SDPA order", sdpa_order(lightning_run, TORCH_ORDER)),
    "trainer_eager": ("Trainer, eager", sdpa_order(eager_run, SDPA_PRIORITY)),
    "trainer_float8": ("soma-lightning, float8", sdpa_order(partial(lightning_run, float8=True), SDPA_PRIORITY)),
    "plain": ("plain PyTorch loop", sdpa_order(plain_run, SDPA_PRIORITY)), "litgpt": ("litgpt GPT", litgpt_run),
}


def summarize(name: str, times: list[float], tokens_per_step: int, flops: dict[str, float], peak: float | None, warmup: int) -> dict:
    timed = times[warmup:]
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    tps = tokens_per_step / seconds
    row = {"run": name, "step_s": seconds, "tokens_per_s": tps, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    for convention, per_token in flops.items():
        row[f"tflops_{convention}"] = tps * per_token / 1e12
        row[f"mfu_{convention}"] = tps * per_token / peak if peak else math.nan
    return row


def spec_and_data(config: str, batch_size: int, seq_len: int, dropout: float) -> tuple[ModelSpec, ByteCorpus]:
    """A spec file's model at `seq_len` with `dropout`, and tiny-Shakespeare windows with the document ids and
    structure its data section asks for."""
    spec = replace(load_spec(config), dropout=dropout, max_seq_len=seq_len)
    annotations = (yaml.safe_load(open(config)).get("data") or {}).get("init_args") or {}
    data = ByteCorpus(seq_len=seq_len, batch_size=batch_size, doc_ids=annotations.get("doc_ids", False), structure=annotations.get("structure", False))
    return spec, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="specs/soma_v1.yaml")
    p.add_argument("--runs", default="trainer,plain,litgpt", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="after timing, profile 3 steps of the plain and litgpt runs: CUDA time by kernel kind")
    p.add_argument("--losses", action="store_true", help="record every Trainer step's loss; print the mean of the last 50")
    p.add_argument("--out", default="compare.json")
    args = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    spec, data = spec_and_data(args.config, args.batch_size, args.seq_len, args.dropout)
    data.setup("fit")
    tokens_per_step = args.batch_size * args.seq_len
    peak = device_peak_flops(torch.device("cuda"))
    meta = build_model(spec, device="meta")
    n_params = count_parameters(meta)[0]
    flops = {"analytic": train_flops_per_token(meta, args.seq_len), "6N": 6 * n_params + 12 * spec.n_layers * spec.d_model * args.seq_len}
    rows = []
    for key in args.runs.split(","):
        name, run = RUNS[key]
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        losses: list[float] | None = [] if args.losses and key.startswith("trainer") else None
        L.seed_everything(0, verbose=False)
        start = time.perf_counter()
        try:
            extra = {"losses": losses} if losses is not None else {}
            times, profiler = run(spec, data, args.steps, compile=args.compile, profile=args.profile, **extra)
            rows.append(summarize(name, times, tokens_per_step, flops, peak, args.warmup))
            rows[-1]["first_step_s"] = times[0] - start
            if losses is not None:
                rows[-1]["losses"] = losses
                rows[-1]["final_loss"] = sum(losses[-50:]) / len(losses[-50:])
            if profiler is not None:
                rows[-1]["profile"] = kernel_profile(name, profiler)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
    result = {
        "config": args.config, "device": torch.cuda.get_device_name(), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "dropout": args.dropout, "compile": args.compile, "steps": args.steps, "warmup": args.warmup, "parameters": n_params,
        "train_flops_per_token": flops, "peak_flops": peak, "rows": rows,
    }
    print(f"{args.config}: {n_params:,} parameters, batch {args.batch_size} x {args.seq_len}, bf16 autocast, compile {args.compile}, dropout {args.dropout}")
    print(f"{'run':28} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU 6N+12LDT':>13} {'peak GiB':>9} {'1st step s':>10}")
    for r in rows:
        print(
            f"{r['run']:28} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:10.0f} {r['tflops_analytic']:8.1f} "
            f"{r['mfu_analytic']:6.1%} {r['mfu_6N']:13.1%} {r['peak_mem_gib']:9.1f} {r['first_step_s']:10.1f}"
            + (f"   loss, mean of last 50: {r['final_loss']:.4f}" if "final_loss" in r else "")
        )
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

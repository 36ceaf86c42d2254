"""Weight-only int8 / int4 against the unquantized model, and the ONNX export, on one checkpoint; prints a
table and writes JSON.

    python bench/quantize.py --ckpt runs/q/version_0 --threads 1 --out quantize.json     # CPU: the float32 baseline
    python bench/quantize.py --ckpt RUN --device cuda                          # CUDA: the bfloat16 baseline

Arms: the baseline (--dtype; default float32 on CPU, where PyTorch's bfloat16 decodes the quickstart model
at about 60% of float32's rate, and bfloat16 on CUDA), then int8 and int4 (soma_lightning/quantize.py) applied to it. Per arm:
* file: bytes of `soma-lightning export --layout state_dict` (the checkpoint's float32 for the baseline)
  and of `export --quantize MODE`;
* memory: bytes of the weights in memory (quantize.weight_bytes: codes, scales and zero points);
* decode tokens/s: the generate path (cached, greedy, batch 1) after the prompt "ROMEO:", the rate of
  bench/generate.py ((N - 1) tokens over the time of N minus that of 1, after a warm-up of N), the best of
  --rounds timings taken in turns with the other arms;
* val bits/byte: Lightning's validate on the validation split of --config's data (default: the run's
  config.yaml), the figure training logs, and its change against the baseline.
For a V1-shaped model also the ONNX export: its file size, ONNX Runtime's largest |logit difference| from
the float32 model, and the time of one forward pass over [1, max_seq_len] tokens in PyTorch (float32) and in
ONNX Runtime (CPU).
"""

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import onnxruntime
import torch
from generate import decode_rate
from timing import timed

import soma_lightning
from soma_lightning.cli.export import export_checkpoint
from soma_lightning.config_files import read_yaml
from soma_lightning.generation import generate
from soma_lightning.lm import SomaLM
from soma_lightning.onnx_export import INPUT, onnx_refusal
from soma_lightning.quantize import quantize, weight_bytes


def datamodule(config: Path) -> L.LightningDataModule:
    data = read_yaml(config)["data"]
    module, name = data["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**data.get("init_args", {}))


def val_bits(module: SomaLM, data: L.LightningDataModule, device: str) -> float:
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    return float(metrics[f"val/{module.bits_metric}"])


def arm(ckpt: str, mode: str | None, dtype: torch.dtype, device: str, data: L.LightningDataModule, folder: Path) -> tuple[dict, SomaLM]:
    file = folder / f"{mode or 'baseline'}.safetensors"
    export_checkpoint(ckpt, str(file), "last", "state_dict", quantize=mode)
    module = soma_lightning.load(ckpt, "last", device)
    module.model.to(dtype)
    if mode is not None:
        quantize(module.model, mode)
    row = {"arm": mode or str(dtype).removeprefix("torch."), "file_bytes": file.stat().st_size, "weight_bytes": weight_bytes(module.model),
           "val_bits": val_bits(module, data, device)}
    return row, module.eval()


def decode_rates(modules: list[SomaLM], new_tokens: int, device: str, rounds: int) -> list[float]:
    """The best of `rounds` decode rates per model, the models taking turns: on a shared machine the load of
    the moment then slows each arm alike, and the best round is the least disturbed."""
    rates = [0.0] * len(modules)
    for _ in range(rounds):
        for i, module in enumerate(modules):
            prompt = module.vocabulary.encode("ROMEO:")
            rate = decode_rate(lambda n: generate(module.model, prompt, n), new_tokens, device, warmup=new_tokens)
            rates[i] = max(rates[i], rate)
    return rates


def onnx_row(ckpt: str, folder: Path) -> dict:
    module = soma_lightning.load(ckpt, "last")
    if problem := onnx_refusal(module.model):
        return {"skipped": problem}
    file = folder / "model.onnx"
    written = export_checkpoint(ckpt, str(file), "last", format="onnx")
    tokens = torch.randint(0, 256, (1, module.arch.max_seq_len), generator=torch.Generator().manual_seed(0))
    model = module.model.float().eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch's
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    torch_s = onnx_s = float("inf")
    for _ in range(3):  # in turns, the best of each, as the decode rates
        with torch.no_grad():
            torch_s = min(torch_s, timed(lambda: model(tokens), steps=10, device="cpu"))
        onnx_s = min(onnx_s, timed(lambda: session.run(None, {INPUT: tokens.numpy()}), steps=10, device="cpu"))
    return {"file_bytes": file.stat().st_size, "max_abs_diff": written["onnxruntime_max_abs_diff"], "opset": written["opset"],
            "torch_forward_ms": torch_s * 1e3, "onnxruntime_forward_ms": onnx_s * 1e3, "tokens": module.arch.max_seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a run directory or .ckpt file")
    parser.add_argument("--config", help="the data config (default: the run's config.yaml)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="the baseline (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="decode timings per arm, taking turns; the best is kept")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    parser.add_argument("--out", default="quantize.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    config = Path(args.config) if args.config else Path(args.ckpt) / "config.yaml"
    if not config.is_file():
        parser.error(f"--config: {config} is not a file; name the data config of {args.ckpt}")
    data = datamodule(config)
    with tempfile.TemporaryDirectory() as tmp:
        rows, modules = zip(*(arm(args.ckpt, mode, dtype, args.device, data, Path(tmp)) for mode in (None, "int8", "int4")))
        for row, rate in zip(rows, decode_rates(list(modules), args.new_tokens, args.device, args.rounds)):
            row |= {"decode_tok_s": rate, "val_bits_change": row["val_bits"] / rows[0]["val_bits"] - 1}
        print(f"{'arm':>9s} {'file MB':>8s} {'memory MB':>10s} {'decode tok/s':>13s} {'val bits/byte':>14s} {'change':>8s}")
        for row in rows:
            print(f"{row['arm']:>9s} {row['file_bytes'] / 1e6:8.3f} {row['weight_bytes'] / 1e6:10.3f} {row['decode_tok_s']:13.1f} "
                  f"{row['val_bits']:14.4f} {row['val_bits_change']:+8.2%}")
        onnx = onnx_row(args.ckpt, Path(tmp))
    if "skipped" in onnx:
        print(f"\nONNX: skipped, {onnx['skipped']}")
    else:
        print(f"\nONNX (opset {onnx['opset']}): {onnx['file_bytes'] / 1e6:.3f} MB, max |logit diff| vs PyTorch {onnx['max_abs_diff']:.2e}; "
              f"forward over [1, {onnx['tokens']}]: PyTorch {onnx['torch_forward_ms']:.2f} ms, ONNX Runtime {onnx['onnxruntime_forward_ms']:.2f} ms")
    result = {"ckpt": args.ckpt, "device": args.device, "baseline_dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "arms": list(rows), "onnx": onnx}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Images from label prompts and clips from transcript prompts of a trained multimodal run, decoded to files.

    python bench/multimodal_samples.py --run runs/gpt5_moe_multimodal/version_0 --data mmshards --out samples

For each label: `--samples` rows of `generate(..., temperature, seed)` from the label's image prompt (the framed
text, then begin-image; data_modules/modalities.py `prompt`), each decoded with the prepared corpus's
tokenizers, and one PNG grid per label (the samples side by side). For each transcript the same with audio,
and per clip its length and RMS per 50 ms. Prints a line per prompt and writes summary.json into --out.
"""

import argparse
import json
import time
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import soma_lightning
from soma_lightning.data_modules.modalities import decode_to_files, prompt
from soma_lightning.data_modules.shards import Shards
from soma_lightning.generation import generate


def image_grid(pngs: list[Path], out: Path) -> None:
    images = [Image.open(p).convert("L") for p in pngs]
    grid = Image.new("L", (sum(im.width + 2 for im in images), max(im.height for im in images)), 255)
    x = 0
    for im in images:
        grid.paste(im, (x, 0))
        x += im.width + 2
    grid.save(out)


def clip_stats(path: Path) -> dict:
    with wave.open(str(path)) as w:
        rate, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16) / 32768
    window = rate // 20
    return {"samples": len(x), "rate": rate, "rms_per_50ms": [float(np.sqrt(np.mean(x[i : i + window] ** 2))) for i in range(0, len(x), window)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory or checkpoint of a model with vocab_ranges")
    p.add_argument("--data", required=True, help="the prepared corpus the run trained on (its tokenizers decode)")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", default="Sneaker,Trouser,Bag,Sandal")
    p.add_argument("--transcripts", default="seven")
    p.add_argument("--samples", type=int, default=3, help="rows per image prompt (audio: 2)")
    p.add_argument("--image-tokens", type=int, default=830, help="new tokens per image (28 x 28 with row markers: 814)")
    p.add_argument("--audio-tokens", type=int, default=2400)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()

    module = soma_lightning.load(args.run, "last")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = module.model.to(args.device, dtype).eval()
    shards, out = Shards.open(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(t, "image", args.samples, args.image_tokens) for t in args.labels.split(",") if t]
    jobs += [(t, "audio", 2, args.audio_tokens) for t in args.transcripts.split(",") if t]
    summary = []
    for text, kind, rows, new_tokens in jobs:
        head = prompt(shards.space, text, kind).tolist()
        start = time.perf_counter()
        result = generate(model, [head] * rows, new_tokens, temperature=args.temperature, seed=args.seed, vocab_ranges=module.arch.vocab_ranges)
        files = [f for i, row in enumerate(result.tokens) for f in decode_to_files(np.array(head + row), shards.space, shards.image, shards.audio, out / f"{kind}_{text}_{i}")]
        record = {"prompt": text, "kind": kind, "new_tokens": [len(r) for r in result.tokens], "stop_reasons": result.stop_reasons,
                  "seconds": time.perf_counter() - start, "files": [str(f) for f in files]}
        if kind == "image":
            image_grid([f for f in files if f.suffix == ".png"], out / f"grid_{text}.png")
        else:
            record["clips"] = [clip_stats(f) for f in files if f.suffix == ".wav"]
        summary.append(record)
        clips = "".join(f", clip {c['samples']} samples, max RMS/50ms {max(c['rms_per_50ms'], default=0):.4f}" for c in record.get("clips", []))
        print(f"{kind} {text!r}: new tokens {record['new_tokens']}, stops {record['stop_reasons']}, {record['seconds']:.0f} s{clips}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Decode speed, side by side in one run; prints tables and writes JSON.

    python bench/generate.py --out generate.json                  # one GPU: full-size specs, bf16
    python bench/generate.py --profile                            # one GPU: where a V1 decode step's time goes
    python bench/generate.py --device cpu --small                 # CPU smoke run: tiny specs, short contexts

1. Decode tokens/s at two contexts (1K and 8K; --small: 128 and 512) for the V1, MoE and hybrid specs
   (random weights, batch 1, greedy): full recompute, the eager cached path, and the cached step replayed
   as a CUDA graph (n/a off CUDA and for models without static decoding, see soma_lightning/generation/cuda_graph.py).
   Decode rate = (N - 1) tokens over the time of generating N tokens minus the time of generating 1 (so the
   prompt's prefill is not counted), after one untimed warm-up generation (of N tokens for the cached
   paths: the graph is captured there).
2. The V1-shaped model: our fastest cached path (eager or graph, printed) vs Hugging Face transformers'
   `generate` (greedy, its default dynamic KV cache) on a GPT-NeoX model of the same shape (pre-norm
   LayerNorm, biased projections, rotary on the full head, exact GELU MLP, sequential residual), at batch 1
   and 16, prompt of the first context. Skipped, with the reason printed, if transformers is not installed.
3. With --speculative-ckpt RUN (a trained model with MTP heads): MTP self-speculative vs plain greedy
   decoding of 128 tokens from four Shakespeare prompts: drafts accepted, tokens per forward pass, wall
   clock speed-up (the outputs are checked equal).
4. With --profile (instead of 1-3): torch.profiler over cached decode steps of the V1 spec at the first
   context, eager and graph: self CPU and self CUDA time per step (a host-bound step has far more CPU than
   CUDA time), and the top 15 ops by self CPU time.
"""

import argparse
import json
import time

import torch

import soma_lightning
from soma_lightning import build_model, load_spec
from soma_lightning.generation import generate, static_blocker
from soma_lightning.hf_format import HFFormatError, to_transformers
from soma_lightning.nn.gqa import GroupedQueryAttention

FULL = {"V1": "specs/soma_v1.yaml", "MoE": "specs/gpt5_moe.yaml", "hybrid": "specs/hybrid_small.yaml"}
SMALL = {"V1": "specs/quickstart.yaml", "MoE": "specs/gpt5_moe_tiny.yaml", "hybrid": "specs/hybrid_tiny.yaml"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(run, new_tokens: int, device: str, warmup: int) -> float:
    """Tokens/s of decoding: `run(n)` generates n tokens after the prompt; one warm-up call of `warmup` first."""
    run(warmup)
    times = {}
    for n in (1, new_tokens):
        _sync(device)
        start = time.perf_counter()
        run(n)
        _sync(device)
        times[n] = time.perf_counter() - start
    return (new_tokens - 1) / max(times[new_tokens] - times[1], 1e-9)


def paths(model, device: str) -> dict:
    """Our cached decoding paths on this device: eager always, the CUDA graph where it applies."""
    arms = {"eager": {"cuda_graph": False}}
    if device.startswith("cuda") and static_blocker(model) is None:
        arms["graph"] = {"cuda_graph": True}
    return arms


def cache_table(specs: dict, contexts: list[int], new_tokens: int, device: str, dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, path in specs.items():
        torch.manual_seed(0)
        model = build_model(load_spec(path), device=device).to(dtype).eval()
        for m in model.modules():  # the same function as flex, which compiles for static shapes: at every new
            if isinstance(m, GroupedQueryAttention):  # length of the full recompute it would recompile
                m.impl = "sdpa"
        for context in contexts:
            prompt = torch.randint(0, 256, (1, context - new_tokens), device=device)
            row = {"model": name, "spec": path, "context": context, "graph_tok_s": None}
            row["recompute_tok_s"] = decode_rate(lambda n: generate(model, prompt, n, use_cache=False), new_tokens, device, warmup=2)
            for arm, options in paths(model, device).items():
                row[f"{arm}_tok_s"] = decode_rate(lambda n: generate(model, prompt, n, **options), new_tokens, device, warmup=new_tokens)
            rows.append(row)
            graph = "n/a" if row["graph_tok_s"] is None else f"{row['graph_tok_s']:.1f}"
            best = max(row["eager_tok_s"], row["graph_tok_s"] or 0)
            print(f"{name:7s} {context:7d} {row['recompute_tok_s']:12.1f} {row['eager_tok_s']:12.1f} {graph:>12s} {best / row['recompute_tok_s']:8.1f}x", flush=True)
        del model
    return rows


def hf_table(spec_path: str, context: int, new_tokens: int, batches: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    ours = build_model(load_spec(spec_path), device=device).eval()
    with torch.no_grad():  # GPT-NeoX's output layer has no bias (hf_format): both then compute the same function
        ours.predictor.bias.zero_()
    try:
        hf = to_transformers(ours, max_positions=context).to(device=device, dtype=dtype).eval()
    except HFFormatError as e:  # transformers is not installed
        print(f"skipped: {e}")
        return [{"skipped": str(e)}]
    ours = ours.to(dtype)
    n_ours, n_hf = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    rows = []
    for batch in batches:
        prompt = torch.randint(0, 256, (batch, context - new_tokens), device=device)

        def run_hf(n):
            with torch.no_grad():
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=256)

        rates = {arm: decode_rate(lambda n: generate(ours, prompt, n, **options), new_tokens, device, warmup=new_tokens) * batch
                 for arm, options in paths(ours, device).items()}
        fastest = max(rates, key=rates.get)
        hf_rate = decode_rate(run_hf, new_tokens, device, warmup=new_tokens) * batch
        rows.append({"batch": batch, "context": context, "ours_path": fastest, "ours_tok_s": rates[fastest], "ours_by_path": rates, "hf_tok_s": hf_rate,
                     "ours_params": n_ours, "hf_params": n_hf})
        print(f"{batch:5d} {context:7d} {rates[fastest]:12.1f} {fastest:>6s} {hf_rate:12.1f} {rates[fastest] / hf_rate:8.2f}", flush=True)
    return rows


def speculative_table(ckpt: str, device: str) -> dict:
    model = soma_lightning.load(ckpt, "last", device).model
    totals = {"plain_s": 0.0, "speculative_s": 0.0, "drafted": 0, "accepted": 0, "tokens": 0, "passes": 0}
    for prompt in (b"ROMEO:\nI will ", b"First Citizen:\nWe are ", b"KING HENRY:\nThe ", b"JULIET:\nO, "):
        generate(model, prompt, 4), generate(model, prompt, 4, speculative=True)
        runs = {}
        for name, speculative in (("plain", False), ("speculative", True)):
            _sync(device)
            start = time.perf_counter()
            runs[name] = generate(model, prompt, 128, speculative=speculative)
            _sync(device)
            totals[f"{name}_s"] += time.perf_counter() - start
        if runs["plain"].tokens != runs["speculative"].tokens:
            raise RuntimeError(f"speculative decoding differs from greedy for {prompt!r}")
        spec = runs["speculative"]
        totals["drafted"] += spec.drafted
        totals["accepted"] += spec.accepted
        totals["tokens"] += len(spec.tokens[0])
        totals["passes"] += spec.forward_passes
    totals |= {"acceptance": totals["accepted"] / totals["drafted"], "tokens_per_pass": totals["tokens"] / totals["passes"],
               "speed_up": totals["plain_s"] / totals["speculative_s"]}
    print(f"\nspeculative ({ckpt}): {totals['accepted']}/{totals['drafted']} drafts accepted ({totals['acceptance']:.1%}), "
          f"{totals['tokens_per_pass']:.2f} tokens per forward pass, {totals['speed_up']:.2f}x wall clock vs plain greedy")
    return totals


def profile_table(spec_path: str, context: int, steps: int, device: str, dtype: torch.dtype) -> list[dict]:
    """Per path: the profile of generating 1 + `steps` tokens minus that of generating 1 (prefill and
    set-up), per step. The profiler's own overhead inflates CPU time; compare the paths and CPU vs CUDA."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(load_spec(spec_path), device=device).to(dtype).eval()
    prompt = torch.randint(0, 256, (1, context - steps - 1), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    rows = []
    for arm, options in paths(model, device).items():
        generate(model, prompt, steps + 1, **options)  # warm-up (the graph is captured here)
        totals = {}
        for n in (1, steps + 1):
            _sync(device)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                generate(model, prompt, n, **options)
                _sync(device)
                wall = time.perf_counter() - start
            events = prof.key_averages()
            totals[n] = (wall, sum(e.self_cpu_time_total for e in events) / 1e6, sum(e.self_device_time_total for e in events) / 1e6)
        wall, cpu, cuda = ((totals[steps + 1][i] - totals[1][i]) / steps * 1e3 for i in range(3))
        rows.append({"path": arm, "spec": spec_path, "context": context, "steps": steps, "wall_ms_per_step": wall, "self_cpu_ms_per_step": cpu, "self_cuda_ms_per_step": cuda})
        print(f"\n{arm} cached decoding, {spec_path}, context {context}, per step over {steps} steps (under the profiler): "
              f"wall {wall:.2f} ms, self CPU {cpu:.2f} ms, self CUDA {cuda:.2f} ms")
        print(f"top 15 ops by self CPU time, generating {steps + 1} tokens (one prefill included):")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny specs and short contexts (CPU smoke run)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per measurement (default 64; --small 16)")
    parser.add_argument("--models", default="V1,MoE,hybrid", help="comma-separated: which specs the cache table measures (V1, MoE, hybrid); empty: none")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--speculative-ckpt", default=None, help="a trained run with MTP heads (e.g. specs/hybrid_tiny.yaml after 300 steps)")
    parser.add_argument("--profile", action="store_true", help="instead of the tables: profile cached decode steps of the V1 spec")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps profiled per path")
    args = parser.parse_args()
    specs, contexts = (SMALL, [128, 512]) if args.small else (FULL, [1024, 8192])
    new_tokens = args.new_tokens or (16 if args.small else 64)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.profile:
        result = {"device": args.device, "dtype": str(dtype), "profile": profile_table(specs["V1"], contexts[0], args.profile_steps, args.device, dtype)}
    else:
        print(f"decode tokens/s, batch 1, greedy, {new_tokens} new tokens, {dtype}, {args.device}")
        print(f"{'model':7s} {'context':>7s} {'recompute':>12s} {'cached':>12s} {'graph':>12s} {'speed-up':>9s}   (best cached / recompute)")
        rows = cache_table({name: specs[name] for name in args.models.split(",") if name}, contexts, new_tokens, args.device, dtype)
        print(f"\nV1-shaped ({specs['V1']}): our fastest cached path vs transformers GPT-NeoX generate, total tokens/s over the batch")
        print(f"{'batch':>5s} {'context':>7s} {'ours':>12s} {'path':>6s} {'hf':>12s} {'ours/hf':>8s}")
        hf_rows = hf_table(specs["V1"], contexts[0], new_tokens, [1, 16], args.device, dtype)
        speculative = speculative_table(args.speculative_ckpt, args.device) if args.speculative_ckpt else None
        result = {"device": args.device, "dtype": str(dtype), "new_tokens": new_tokens, "cache": rows, "transformers": hf_rows, "speculative": speculative}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

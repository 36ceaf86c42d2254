"""The MoE family on one GPU, side by side in one run; prints tables and writes JSON.

    python bench/moe.py --out moe.json

1. MoE layer forward+backward (bf16): grouped GEMM vs the per-expert loop, 8 and 16 experts, 4K to 32K
   tokens (32K is gpt5_moe.yaml's batch), both eager, and the grouped arm compiled, with a check that all
   compute the same outputs. --profile: CUDA kernel time per step of each arm at 8 experts and 4K tokens,
   next to the wall time (kernel time well under wall time: the step is host-bound).
2. Whole model: specs/gpt5_moe.yaml training tokens/s vs a dense model of the same active parameter count
   (a GELU MLP as wide as two experts) and the same attention.
3. Long context: training tokens/s and peak memory at 8K and 32K tokens, local+global vs full causal, for
   the whole model (as specified, and with the structural bias off in both arms) and for the attention op
   alone.
Training steps are bf16 autocast + fused AdamW over the model and CE loss on tiny-Shakespeare windows with
their structure (the objective's SIGReg term and Lightning are left out: they are the same for both arms and
measured in bench/compare.py).
"""

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from soma_lightning import build_model, load_spec
from soma_lightning.data_modules.structure import batch_structure
from soma_lightning.measure import count_parameters, train_flops_per_token
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.moe import MoE

from timing import kernel_profile, profile_steps, timed, timed_ms


ARMS = ("loop", "grouped", "grouped, compiled")


def moe_layers(token_counts: tuple[int, ...], d: int, hidden: int, steps: int, profile: bool = False) -> list[dict]:
    """Both arms eager, and the grouped arm compiled too ("grouped, compiled": what `--model.compile true`
    runs; the loop reads counts back to the host, so it has no compiled form worth timing)."""
    rows = []
    for tokens, experts in ((t, e) for t in token_counts for e in (8, 16)):
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ctx = SequenceContext(positions=torch.arange(tokens, device="cuda")[None])
        outputs, times = {}, {}
        for arm in ARMS:
            torch.manual_seed(1)
            moe = MoE(d, hidden, num_experts=experts, top_k=2, impl=arm.split(",")[0]).cuda().to(torch.bfloat16)
            run = torch.compile(moe) if arm.endswith("compiled") else moe

            def step():
                y = run(x, ctx)
                (y.float().square().mean() + moe.aux_loss).backward()
                return y

            outputs[arm] = step().detach().float()
            times[arm] = timed(step, steps, 3)
            if profile and (tokens, experts) == (token_counts[0], 8):
                print(f"\n{arm}, {experts} experts, {tokens} tokens: wall {times[arm] * 1e3:.2f} ms per step")
                kernel_profile(arm, profile_steps(step))
        err = max(((outputs[arm] - outputs["loop"]).norm() / outputs["loop"].norm()).item() for arm in outputs)
        rows.append({"experts": experts, "tokens": tokens, "ms": {arm: times[arm] * 1e3 for arm in ARMS},
                     "speedup": {arm: times["loop"] / times[arm] for arm in ARMS[1:]}, "rel_err": err})
    return rows


def train_step_rate(arch, batch: int, seq_len: int, steps: int, doc_ids: bool = True) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(arch, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    text = open("soma_lightning/corpora/tinyshakespeare.txt", "rb").read()
    tokens = torch.tensor([list(text[i * seq_len : (i + 1) * seq_len]) for i in range(batch)])
    structure = batch_structure(tokens).cuda()
    tokens = tokens.cuda()
    docs = (torch.arange(seq_len, device="cuda") // 3000).expand(batch, -1) if doc_ids else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens, doc_ids=docs, structure=structure)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
        loss = loss + sum(m.aux_loss for m in model.modules() if isinstance(m, MoE))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, steps, 3)
    total, active = count_parameters(model)
    flops = train_flops_per_token(model, seq_len)
    del model, opt
    return {"seconds": seconds, "tokens_per_s": batch * seq_len / seconds, "tflops": batch * seq_len * flops / seconds / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "total_params": total, "active_params": active}


def attention_ops(seq_len: int, steps: int) -> dict:
    """The attention op alone, forward+backward, one sequence, 16 query / 4 KV heads of 64: FlexAttention
    with the local 4096 + global 1024 block mask (with our tiles, with inductor's default tiles, and with the
    structural bias of tiny-Shakespeare's structure, its table with and without a gradient) vs SDPA full
    causal (flash). The structural rows exclude `structure_buckets`, which runs once per batch, not per layer:
    its own row times it."""
    from soma_lightning.nn.ops.attention.flex import block_mask, flex, with_global_keys
    from soma_lightning.nn.ops.attention.structure_bias import flex_with_structure_bias, structure_buckets

    q = torch.randn(1, 16, seq_len, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4, seq_len, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mask = block_mask(seq_len, 4096, 1024, None, q.device)
    text = open("soma_lightning/corpora/tinyshakespeare.txt", "rb").read()[:seq_len]
    structure = batch_structure(torch.tensor([list(text)])).cuda()
    buckets = structure_buckets(structure, 16, 4096, 1024)

    def local_global(**kwargs):
        return lambda: flex(q, with_global_keys(k, 1024), with_global_keys(v, 1024), mask, **kwargs).sum().backward()

    def structural(table):
        return lambda: flex_with_structure_bias(q, k, v, mask, table, buckets, None, 4096, 1024).sum().backward()

    runs = {
        "local+global (flex)": local_global(),
        "local+global (flex, inductor's tiles)": local_global(kernel_options={}),
        "local+global + structural bias": structural(torch.zeros(16, 16, device="cuda", requires_grad=True)),
        "  the same, bias table without gradient": structural(torch.zeros(16, 16, device="cuda")),
        "  structure_buckets (once per batch)": lambda: structure_buckets(structure, 16, 4096, 1024),
        "full causal (sdpa)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward(),
    }
    return {name: timed_ms(run, steps) for name, run in runs.items()}


def with_ffn(arch, ffn: dict):
    """The spec with every block's FFN sublayer replaced."""
    arch = copy.deepcopy(arch)
    for sublayers in arch.blocks.values():
        for sub in sublayers:
            if "ffn" in sub:
                sub["ffn"] = ffn
    return arch


def with_attention(arch, **changes):
    """The spec with `changes` applied to every block's mixer."""
    arch = copy.deepcopy(arch)
    for sublayers in arch.blocks.values():
        for sub in sublayers:
            if "mixer" in sub:
                sub["mixer"] = {**sub["mixer"], **changes}
    return arch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="specs/gpt5_moe.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--parts", default="layer,model,long_context,attention_op", help="comma-separated: layer, model, long_context, attention_op")
    p.add_argument("--out", default="moe.json")
    p.add_argument("--profile", action="store_true", help="layer part: kernel profile of each arm at 8 experts, 4K tokens")
    args = p.parse_args()
    # Every shape and mask here compiles FlexAttention once more; past dynamo's default limit of 8 it would
    # fall back to eager attention, which materialises the scores (64 GiB at 32K).
    torch._dynamo.config.recompile_limit = 64
    result = {"device": torch.cuda.get_device_name()}
    parts = args.parts.split(",")
    moe = load_spec(args.config)
    if "layer" in parts:
        result["moe_layer"] = moe_layers((4096, 16384, 32768), d=1024, hidden=2048, steps=args.steps, profile=args.profile)
        print(f"\n{'experts':>7} {'tokens':>7} {'loop ms':>8}" + "".join(f" {arm + ' ms':>20} {'x':>5}" for arm in ARMS[1:]) + f" {'rel err':>8}")
        for r in result["moe_layer"]:
            print(f"{r['experts']:7d} {r['tokens']:7d} {r['ms']['loop']:8.2f}"
                  + "".join(f" {r['ms'][arm]:20.2f} {r['speedup'][arm]:5.2f}" for arm in ARMS[1:]) + f" {r['rel_err']:8.1e}")
    if "model" in parts:
        mixer_ffn = moe.blocks["layer"][1]["ffn"]  # the MoE of the spec's first block
        dense = with_ffn(moe, {"type": "gelu_mlp", "hidden_dim": mixer_ffn["top_k"] * 3 * mixer_ffn["hidden_dim"] // 2})
        result["model"] = {name: train_step_rate(arch, 4, 8192, args.steps) for name, arch in (("moe", moe), ("dense, same active", dense))}
        print(f"\n{'model (8K x 4)':20} {'total':>8} {'active':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'peak GiB':>8}")
        for name, r in result["model"].items():
            print(f"{name:20} {r['total_params'] / 1e9:7.2f}B {r['active_params'] / 1e9:7.2f}B {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {r['peak_gib']:8.1f}")
        print(f"moe / dense tokens/s: {result['model']['moe']['tokens_per_s'] / result['model']['dense, same active']['tokens_per_s']:.2f}")
    if "long_context" in parts:
        result["long_context"] = []
        print(f"\n{'context':>7} {'attention':14} {'structural bias':>15} {'tokens/s':>9} {'peak GiB':>8}")
        for structure in (True, False):
            spec = moe if structure else with_attention(moe, structure_buckets=None)
            for seq_len, batch in ((8192, 4), (32768, 1)):
                for name, arch in (("local+global", spec), ("full causal", with_attention(spec, window=None, global_stride=None))):
                    try:
                        r = train_step_rate(arch, batch, seq_len, max(3, args.steps // 2), doc_ids=False)
                    except torch.OutOfMemoryError:
                        r = {"tokens_per_s": 0.0, "peak_gib": float("nan"), "oom": True}
                        torch.cuda.empty_cache()
                    result["long_context"].append({"seq_len": seq_len, "batch": batch, "attention": name, "structural_bias": structure, **r})
                    print(f"{seq_len:7d} {name:14} {'as specified' if structure else 'off':>15} {r['tokens_per_s']:9.0f} {r['peak_gib']:8.1f}")
    if "attention_op" in parts:
        result["attention_op_ms"] = {t: attention_ops(t, args.steps) for t in (8192, 32768)}
        print(f"\n{'context':>7} {'attention op fwd+bwd':40} {'ms':>8}")
        for t, r in result["attention_op_ms"].items():
            for name, ms in r.items():
                print(f"{t:7d} {name:40} {ms:8.2f}")
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

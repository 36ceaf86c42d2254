"""The hybrid superblock's mixer on one GPU, side by side in one run; prints tables and writes JSON.

    python bench/hybrid.py --out hybrid.json

1. Mixer forward+backward vs sequence length (2K, 8K, 32K; the same 32K tokens per step): our Gated
   DeltaNet layer (fla kernels) vs causal SDPA attention (our GQA layer, as many query as KV heads) at equal
   width, each with its projections; and the two core ops alone (fla's chunked delta rule vs flash SDPA).
   Batch sizes are chosen so that fla's tilelang backward (Hopper) compiles few kernels: it compiles one per
   batch size and head layout, taking 1-2 minutes each.
2. Our Gated DeltaNet layer vs flash-linear-attention's own `GatedDeltaNet` layer at the same dimensions
   (sigmoid output gate, 4-tap convolution, GVA): ROUNDS rounds, each timing ours then theirs, so that the
   machine's drift falls on both; the medians, and the spread of the per-round ratios. --profile: CUDA
   kernel time per step of both layers at the longest length.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.ops.delta_rule import gated_delta_rule
from soma_lightning.nn.gated_deltanet import GatedDeltaNet
from soma_lightning.nn.gqa import GroupedQueryAttention

from timing import kernel_profile, profile_steps, timed_ms

TOKENS = 32768
ROUNDS = 5


def layer_step(layer, x: torch.Tensor, ctx: SequenceContext | None):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, ctx) if ctx is not None else layer(x)
            y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()

    return step


def mixers(d: int, heads: int, head_dim: int, steps: int) -> list[dict]:
    """The delta rule runs the step's sequences packed in one row, cut into documents of seq_len (fla's
    variable-length path: one compiled kernel for every length); attention runs them as a batch."""
    rows = []
    for seq_len in (2048, 8192, 32768):
        batch = TOKENS // seq_len
        torch.manual_seed(0)
        packed = torch.randn(1, TOKENS, d, device="cuda", requires_grad=True)
        docs = SequenceContext(positions=torch.arange(TOKENS, device="cuda")[None] % seq_len, doc_ids=torch.arange(TOKENS, device="cuda")[None] // seq_len)
        x = packed.detach().view(batch, seq_len, d).requires_grad_()
        ctx = SequenceContext(positions=torch.arange(seq_len, device="cuda").expand(batch, -1))
        gdn = GatedDeltaNet(d, num_heads=heads // 2, num_v_heads=heads, head_dim=head_dim).cuda()
        attn = GroupedQueryAttention(d, num_heads=heads, num_kv_heads=heads, head_dim=head_dim, impl="sdpa").cuda()
        row = {"seq_len": seq_len, "batch": batch,
               "gdn_layer_ms": timed_ms(layer_step(gdn, packed, docs), steps), "attention_layer_ms": timed_ms(layer_step(attn, x, ctx), steps)}

        q, k = (torch.randn(1, TOKENS, heads // 2, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        v = torch.randn(1, TOKENS, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = F.logsigmoid(torch.randn(1, TOKENS, heads, device="cuda")).requires_grad_()
        beta = torch.rand(1, TOKENS, heads, device="cuda").requires_grad_()
        resets = docs.doc_ids.diff(dim=1, prepend=docs.doc_ids[:, :1]) != 0
        row["delta_rule_op_ms"] = timed_ms(lambda: gated_delta_rule(q, k, v, g, beta, resets, impl="fla").sum().backward(), steps)
        qt, kt, vt = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        row["sdpa_op_ms"] = timed_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).sum().backward(), steps)
        rows.append(row)
    return rows


def against_fla(d: int, heads: int, head_dim: int, steps: int, profile: bool = False) -> list[dict]:
    from fla.layers import GatedDeltaNet as FlaGatedDeltaNet

    rows = []
    for seq_len, batch in ((16384, 1), (32768, 1)):
        torch.manual_seed(0)
        x = torch.randn(batch, seq_len, d, device="cuda", requires_grad=True)
        ctx = SequenceContext(positions=torch.arange(seq_len, device="cuda").expand(batch, -1))
        ours = GatedDeltaNet(d, num_heads=heads // 2, num_v_heads=heads, head_dim=head_dim).cuda()
        theirs = FlaGatedDeltaNet(hidden_size=d, expand_v=1, head_dim=head_dim, num_heads=heads // 2, num_v_heads=heads,
                                  use_gate=True, output_gate_activation="sigmoid", conv_size=4, norm_eps=1e-6).cuda()
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
        steps_of = {"ours": layer_step(ours, x, ctx), "fla": layer_step(theirs, x, None)}
        times = {name: [] for name in steps_of}
        for _ in range(ROUNDS):
            for name, step in steps_of.items():
                times[name].append(timed_ms(step, steps))
        ratios = [a / b for a, b in zip(times["ours"], times["fla"])]
        rows.append({"seq_len": seq_len, "batch": batch, "ours_ms": statistics.median(times["ours"]), "fla_ms": statistics.median(times["fla"]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "ours_params": n_ours, "fla_params": n_theirs, "rounds": times})
        if profile and seq_len == 32768:
            for name, step in steps_of.items():
                rows[-1][f"{name}_profile"] = kernel_profile(f"{name} at {seq_len}", profile_steps(step))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16, help="attention heads = GDN value heads (q/k heads: half)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--parts", default="mixers,against_fla", help="comma-separated: mixers, against_fla")
    p.add_argument("--out", default="hybrid.json")
    p.add_argument("--profile", action="store_true", help="against_fla: kernel profile of both layers at 32K")
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "d_model": args.d_model, "heads": args.heads, "head_dim": args.head_dim}

    parts = args.parts.split(",")
    if "mixers" in parts:
        result["mixers"] = mixers(args.d_model, args.heads, args.head_dim, args.steps)
        print(f"fwd+bwd ms, {TOKENS} tokens per step, d {args.d_model}")
        print(f"{'seq':>6} {'batch':>5} {'GDN layer':>10} {'attn layer':>10} {'delta op':>9} {'sdpa op':>8}")
        for r in result["mixers"]:
            print(f"{r['seq_len']:6d} {r['batch']:5d} {r['gdn_layer_ms']:10.2f} {r['attention_layer_ms']:10.2f} {r['delta_rule_op_ms']:9.2f} {r['sdpa_op_ms']:8.2f}")
    if "against_fla" in parts:
        result["against_fla"] = against_fla(args.d_model, args.heads, args.head_dim, args.steps, args.profile)
        print(f"\nmedians of {ROUNDS} interleaved rounds")
        print(f"{'seq':>6} {'batch':>5} {'ours ms':>8} {'fla ms':>8} {'ours/fla':>8} {'ratio range':>12} {'params ours/fla':>18}")
        for r in result["against_fla"]:
            spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
            print(f"{r['seq_len']:6d} {r['batch']:5d} {r['ours_ms']:8.2f} {r['fla_ms']:8.2f} {r['ratio']:8.2f} {spread:>12} {r['ours_params']:>9}/{r['fla_params']}")
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

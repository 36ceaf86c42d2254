"""The training objective's SIGReg term at one shape (default: SOMA V1's training batch, 16 x 1024 tokens of
width 2048, 256 slices, 17 points): forward+backward ms, the eager rotation loops against their torch.compile
form (what training with `--model.compile true` runs), each checked against the contract's reference.

    python bench/sigreg.py --out sigreg.json
"""

import argparse
import json

import torch

from soma_lightning.nn.sigreg import sigreg_statistic, sigreg_statistic_reference

from timing import timed_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,1024,2048", help="B,T,D of the representations")
    p.add_argument("--slices", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="sigreg.json")
    args = p.parse_args()
    b, t, d = (int(v) for v in args.shape.split(","))
    x = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    noise = torch.randn(d, args.slices, device="cuda")
    ref = sigreg_statistic_reference(x[:2], noise)  # [2, T, K, points] fits; the full batch's would not
    (grad_ref,) = torch.autograd.grad(ref, x)
    rows = []
    for compiled in (False, True):
        def step() -> None:
            sigreg_statistic(x, noise, compiled=compiled).backward()

        ms = timed_ms(step, args.steps)
        value = sigreg_statistic(x[:2], noise, compiled=compiled)
        (grad,) = torch.autograd.grad(value, x)
        rows.append({
            "path": "compiled" if compiled else "eager", "ms": ms, "value_rel_err": abs(value.item() - ref.item()) / abs(ref.item()),
            "grad_rel_err": ((grad.float() - grad_ref.float()).norm() / grad_ref.float().norm()).item(),
        })
    print(f"SIGReg forward+backward, x [{b}, {t}, {d}] bf16, {args.slices} slices, 17 points, {torch.cuda.get_device_name()}")
    print(f"{'path':10} {'ms':>8} {'value err':>10} {'grad err':>10}")
    for r in rows:
        print(f"{r['path']:10} {r['ms']:8.2f} {r['value_rel_err']:10.2e} {r['grad_rel_err']:10.2e}")
    json.dump({"shape": [b, t, d], "slices": args.slices, "device": torch.cuda.get_device_name(), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

"""Causal attention forward+backward per backend of PyTorch's scaled_dot_product_attention, at one shape
(default: SOMA V1's layer, B16 H8 T1024 head dim 256, bf16), each checked against the float32 reference.

    python bench/attention.py --out attention.json

Prints a table (ms per forward+backward, relative error of output and of dq against the reference) and writes
JSON. A backend that refuses the shape (or dropout) is listed with its reason.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import timed_ms

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16,8,1024,256", help="B,H,T,D")
    p.add_argument("--dropout", type=float, nargs="*", default=[0.0, 0.1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="attention.json")
    args = p.parse_args()
    b, h, t, d = (int(v) for v in args.shape.split(","))
    q, k, v = (torch.randn(b, h, t, d, device="cuda", requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, t, d, device="cuda")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # float32: the math or efficient kernel
    (dq_ref,) = torch.autograd.grad(ref, q, grad)
    qb, kb, vb = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    rows = []
    for dropout in args.dropout:
        for name, backend in BACKENDS.items():
            def step() -> torch.Tensor:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, dropout_p=dropout)
                out.backward(grad.bfloat16())
                return out
            row = {"backend": name, "dropout": dropout}
            try:
                out = step()
                if dropout == 0.0:
                    qb.grad = None
                    out = step()
                    row |= {"rel_err_out": _rel(out.float(), ref), "rel_err_dq": _rel(qb.grad.float(), dq_ref)}
                row["ms"] = timed_ms(step, args.steps)
            except RuntimeError as e:
                row["refused"] = " ".join(str(e).split())[:160]
            rows.append(row)
    print(f"causal SDPA forward+backward, B{b} H{h} T{t} D{d}, bf16, {torch.cuda.get_device_name()}")
    print(f"{'backend':10} {'dropout':>7} {'ms':>8} {'err out':>9} {'err dq':>9}")
    for r in rows:
        if "refused" in r:
            print(f"{r['backend']:10} {r['dropout']:7.2f}  refused: {r['refused']}")
        else:
            print(f"{r['backend']:10} {r['dropout']:7.2f} {r['ms']:8.2f} {r.get('rel_err_out', float('nan')):9.2e} {r.get('rel_err_dq', float('nan')):9.2e}")
    json.dump({"shape": [b, h, t, d], "device": torch.cuda.get_device_name(), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()

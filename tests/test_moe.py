import math

import pytest
import torch
import torch.nn.functional as F

from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.moe import MoE, expert_grouped, expert_loop


def _ctx(x):
    return SequenceContext(positions=torch.arange(x.shape[1]).expand(x.shape[0], -1))


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, dropless: sum over the chosen experts of gate * expert(x)."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.router(flat).float().softmax(-1)
    scores = probs + moe.selection_bias if moe.balance == "aux_free" else probs
    chosen = scores.topk(moe.top_k, dim=-1).indices
    gates = probs.gather(-1, chosen)
    if moe.renormalize:
        gates = gates / gates.sum(-1, keepdim=True)

    def mlp(v, w_in, w_out):
        h = v @ w_in
        if moe.swiglu:
            g, u = h.chunk(2, -1)
            return (F.silu(g) * u) @ w_out
        return F.gelu(h) @ w_out

    out = torch.zeros_like(flat)
    for n in range(len(flat)):
        for j in range(moe.top_k):
            e = chosen[n, j]
            out[n] += gates[n, j] * mlp(flat[n], moe.w_in[e], moe.w_out[e])
        for s in range(0 if moe.shared_in is None else moe.shared_in.shape[0]):
            out[n] += mlp(flat[n], moe.shared_in[s], moe.shared_out[s])
    return out.view_as(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_experts": 8, "top_k": 2},
        {"num_experts": 4, "top_k": 1, "activation": "gelu", "renormalize": False},
        {"num_experts": 6, "top_k": 3, "num_shared_experts": 2, "balance": "aux_free"},
    ],
)
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_dropless_moe_equals_token_by_token_reference(kwargs, impl):
    moe = MoE(16, hidden_dim=24, impl=impl, **kwargs)
    if moe.balance == "aux_free":
        moe.selection_bias.copy_(torch.randn(moe.num_experts) * 0.1)
    x = torch.randn(3, 11, 16)
    torch.testing.assert_close(moe(x, _ctx(x)), moe_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_grouped_gemm_equals_loop_with_empty_experts_values_and_gradients():
    x = torch.randn(20, 16, requires_grad=True)
    w_in = torch.randn(5, 16, 48, requires_grad=True)
    w_out = torch.randn(5, 24, 16, requires_grad=True)
    counts = torch.tensor([7, 0, 13, 0, 0])  # experts 1, 3, 4 receive no tokens
    outs, grads = [], []
    for run in (expert_loop, expert_grouped):
        y = run(x, w_in, w_out, counts, swiglu=True)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), (x, w_in, w_out)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_layer_gradients_equal_between_loop_and_grouped():
    loop = MoE(16, hidden_dim=24, num_experts=8, top_k=2, impl="loop", capacity_factor=1.0)
    grouped = MoE(16, hidden_dim=24, num_experts=8, top_k=2, impl="grouped", capacity_factor=1.0)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(2, 30, 16)
    results = []
    for moe in (loop, grouped):
        y = moe(x, _ctx(x))
        (y.square().sum() + moe.aux_loss).backward()
        results.append((y, [p.grad for p in moe.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_capacity_drops_the_later_assignments_and_reports_it():
    torch.manual_seed(1)
    moe = MoE(8, hidden_dim=8, num_experts=4, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(1, 40, 8).abs()
    y = moe(x, _ctx(x))
    capacity = math.ceil(0.5 * 40 / 4)
    assert moe.stats["tokens_per_expert"].tolist() == [0, 0, 40, 0]
    assert moe.stats["dropped_fraction"].item() == pytest.approx(1 - capacity / 40)
    assert torch.count_nonzero(y.abs().sum(-1)) == capacity
    assert (y[0, capacity:] == 0).all() and (y[0, :capacity] != 0).any(dim=-1).all()


def test_switch_aux_loss_and_z_loss_values():
    moe = MoE(8, hidden_dim=8, num_experts=4, top_k=2, aux_loss_weight=0.5, z_loss_weight=0.25)
    x = torch.randn(2, 9, 8)
    moe(x, _ctx(x))
    logits = moe.router(x.transpose(0, 1).reshape(-1, 8))
    probs = logits.softmax(-1)
    load = moe.stats["tokens_per_expert"].float() / (18 * 2)
    expected = 0.5 * 4 * (load * probs.mean(0)).sum() + 0.25 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(moe.aux_loss, expected)
    assert moe.stats["tokens_per_expert"].sum() == 36


def test_aux_free_bias_moves_towards_balance_without_gradient():
    moe = MoE(8, hidden_dim=8, num_experts=4, top_k=1, balance="aux_free", bias_update_rate=0.1, z_loss_weight=0.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # expert 0 gets everything
    x = torch.rand(1, 32, 8)
    moe(x, _ctx(x))
    assert moe.aux_loss.item() == 0.0
    moe.update_selection_bias()
    assert moe.selection_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert not moe.selection_bias.requires_grad


def test_counts_for_inspect():
    moe = MoE(16, hidden_dim=32, num_experts=8, top_k=2, num_shared_experts=1)
    per_expert = 16 * 64 + 32 * 16
    assert moe.inactive_parameters() == 6 * per_expert
    assert moe.flops_per_token(128) == 2 * 16 * 8 + 2 * 2 * per_expert + 2 * per_expert


@pytest.mark.parametrize("kwargs, message", [({"top_k": 9}, "top_k: must be in 1..num_experts (8), got 9"), ({"capacity_factor": 0.0}, "capacity_factor")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoE(16, hidden_dim=8, **kwargs)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_moe_under_bf16_autocast_is_close_to_float32(impl):
    moe = MoE(32, hidden_dim=32, num_experts=4, top_k=2, num_shared_experts=1, impl=impl)
    x = torch.randn(2, 20, 32)
    expected = moe(x, _ctx(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, _ctx(x))
    assert out.dtype == torch.float32
    assert ((out - expected).norm() / expected.norm()).item() < 2e-2

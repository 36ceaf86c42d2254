"""The moe FFN's expert-choice and soft routing: each equals a plain per-token reference, is causal in the
form the layer uses and leaks in the original form, passes gradients, and decodes from a cache as a full pass."""

import math

import pytest
import torch
import torch.nn.functional as F

from soma_lightning import build_model
from soma_lightning.errors import SpecError
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.moe import MoE
from conftest import tiny_v1_arch


def _ctx(x):
    return SequenceContext(positions=torch.arange(x.shape[1]).expand(x.shape[0], -1))


def _mlp(moe: MoE, v, w_in, w_out):
    h = v @ w_in
    if moe.swiglu:
        g, u = h.chunk(2, -1)
        return (F.silu(g) * u) @ w_out
    return F.gelu(h) @ w_out


def _shared(moe: MoE, v):
    n = 0 if moe.shared_in is None else moe.shared_in.shape[0]
    return sum((_mlp(moe, v, moe.shared_in[s], moe.shared_out[s]) for s in range(n)), torch.zeros_like(v))


def expert_choice_reference(moe: MoE, x):
    """Token by token: expert e takes token t of chunk c >= 1 when its probability reaches the capacity-th
    largest of e over chunk c - 1 of the row; in chunk 0 a token takes its top_k experts."""
    b, t, _ = x.shape
    c, e = moe.routing_chunk, moe.num_experts
    capacity = math.ceil(c * moe.top_k / e)
    probs = moe.router(x).float().softmax(-1)
    out = torch.zeros_like(x)
    for row in range(b):
        for i in range(t):
            chunk = i // c
            for expert in range(e):
                if chunk == 0:
                    take = expert in probs[row, i].topk(moe.top_k).indices.tolist()
                else:
                    before = probs[row, (chunk - 1) * c : chunk * c, expert]
                    take = probs[row, i, expert] >= before.sort(descending=True).values[capacity - 1]
                if take:
                    out[row, i] += probs[row, i, expert] * _mlp(moe, x[row, i], moe.w_in[expert], moe.w_out[expert])
            out[row, i] += _shared(moe, x[row, i])
    return out


def soft_reference(moe: MoE, x):
    """Token by token: the slots that chunk c combines average chunk c - 1's tokens (softmax over them per
    slot); token t mixes the slot outputs by its softmax over the slots; chunk 0 gets nothing."""
    b, t, _ = x.shape
    c, s = moe.routing_chunk, moe.slots_per_expert
    logits = moe.router(x).float()
    out = torch.zeros_like(x)
    for row in range(b):
        for i in range(t):
            chunk = i // c
            if chunk > 0:
                before = slice((chunk - 1) * c, chunk * c)
                combine = logits[row, i].softmax(-1)
                for slot in range(moe.num_experts * s):
                    dispatch = logits[row, before, slot].softmax(0)
                    slot_input = dispatch @ x[row, before]
                    out[row, i] += combine[slot] * _mlp(moe, slot_input, moe.w_in[slot // s], moe.w_out[slot // s])
            out[row, i] += _shared(moe, x[row, i])
    return out


CASES = [
    ({"routing": "expert_choice", "num_experts": 4, "top_k": 2}, expert_choice_reference),
    ({"routing": "expert_choice", "num_experts": 6, "top_k": 1, "activation": "gelu", "num_shared_experts": 1}, expert_choice_reference),
    ({"routing": "soft", "num_experts": 3, "slots_per_expert": 2}, soft_reference),
    ({"routing": "soft", "num_experts": 4, "num_shared_experts": 1, "activation": "gelu"}, soft_reference),
]


@pytest.mark.parametrize("args, reference", CASES)
def test_routing_equals_its_token_by_token_reference(args, reference):
    moe = MoE(16, hidden_dim=24, routing_chunk=5, **args)
    x = torch.randn(2, 18, 16)  # the last chunk partial
    torch.testing.assert_close(moe(x, _ctx(x)), reference(moe, x), rtol=1e-5, atol=1e-5)


def _model(routing: str, **args):
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][1]["ffn"] = {"type": "moe", "hidden_dim": 16, "num_experts": 4, "top_k": 2, "routing": routing, "routing_chunk": 8, **args}
    torch.manual_seed(0)
    return build_model(arch).eval()


def _first_change(model, t: int = 17, length: int = 40) -> float:
    """The largest change of the representations at positions <= t when the tokens after t change."""
    a = torch.randint(0, 256, (2, length))
    b = a.clone()
    b[:, t + 1 :] = torch.randint(0, 256, (2, length - t - 1))
    with torch.no_grad():
        return (model.encode(a)[:, : t + 1] - model.encode(b)[:, : t + 1]).abs().max().item()


@pytest.mark.parametrize("routing", ["expert_choice", "soft"])
def test_the_original_form_leaks_and_the_delayed_form_is_causal(routing):
    model = _model(routing)
    assert _first_change(model) == 0.0
    for layer in model.encoder.layers:
        layer.moe.routing_delay = 0  # chunk 2 (16..23) routed by its own tokens, 18..23 among them
    assert _first_change(model) > 1e-4


@pytest.mark.parametrize("routing", ["expert_choice", "soft"])
def test_gradients_reach_router_and_experts(routing):
    moe = MoE(16, hidden_dim=24, num_experts=4, routing=routing, routing_chunk=4)
    x = torch.randn(2, 12, 16, requires_grad=True)
    moe(x, _ctx(x)).square().sum().backward()
    for p in (moe.router.weight, moe.w_in, moe.w_out, x):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad[:, :4].abs().sum() > 0  # soft: chunk 0 only feeds the slots of chunk 1


@pytest.mark.parametrize("routing", ["expert_choice", "soft"])
def test_cached_decoding_equals_a_full_pass(routing):
    model = _model(routing, num_shared_experts=1)
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        state = DecodeState(keep_steps=True)
        steps = [model.predict(model.extend(tokens[:, :13], state)[0])]
        model.extend(tokens[:, 13:18].flip(1), state)  # rejected, then rolled back
        state.rollback(13)
        steps += [model.predict(model.extend(tokens[:, i : i + 1], state)[0]) for i in range(13, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_routing_refuses_token_choice_balancing():
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][1]["ffn"] = {"type": "moe", "hidden_dim": 16, "routing": "soft", "capacity_factor": 1.0}
    with pytest.raises(SpecError, match=r"ffn.routing: 'soft' balances by itself"):
        build_model(arch)

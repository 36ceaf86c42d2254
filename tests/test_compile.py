"""torch.compile of the blocks, as SomaLM's `compile: true` applies it (each of model.encoder.layers compiled on
its own), for every tiny spec on the CPU: each block traces into one graph, in training with gradients and with
the batch annotations its data section asks for; the blocks of one kind share one graph, and later batches
(other tokens, so other MoE routing) compile nothing new; compiled blocks compute what eager ones do.

Graph breaks and recompiles are TorchDynamo's, so those checks run its "eager" backend; the values are checked
through AOTAutograd ("aot_eager"), and through inductor in the slow set."""

import dataclasses

import pytest
import torch
import yaml

from soma_lightning.data_modules.byte_corpus import annotate
from soma_lightning.data_modules.contract import EOS
from soma_lightning.nn.moe import MoE
from soma_lightning.spec import build_model, load_spec

TINY_SPECS = [
    "specs/quickstart.yaml",
    "specs/gpt5_moe_tiny.yaml",
    "specs/gpt5_moe_multimodal_tiny.yaml",
    "specs/hybrid_tiny.yaml",
    "specs/sosm_tiny.yaml",
    "specs/shakespeare_baseline.yaml",
]
TEXT = open("soma_lightning/corpora/tinyshakespeare.txt", "rb").read()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(spec: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_spec(spec)).train()


def _batch(spec: str, seed: int, b: int = 2) -> dict[str, torch.Tensor]:
    """b windows of tiny Shakespeare with a document break (EOS) inside, at their corpus offsets, and the
    annotations (doc_ids, structure) the spec's data section asks for."""
    cfg = yaml.safe_load(open(spec))
    t = min(cfg["model"]["arch"]["max_seq_len"], 96)
    starts = torch.randint(0, len(TEXT) - t, (b,), generator=torch.Generator().manual_seed(seed))
    tokens = torch.tensor([list(TEXT[s : s + t]) for s in starts.tolist()])
    tokens[:, t // 3 + seed] = EOS
    init = cfg["data"]["init_args"]
    batch = annotate({"tokens": tokens}, tuple(name for name in ("doc_ids", "structure") if init.get(name)))
    return {"positions": starts[:, None] + torch.arange(t), "doc_ids": None, "structure": None} | batch


def _train_forward(model, batch) -> torch.Tensor:
    """The training forward (SomaLM.training_step's encode_with_mtp) -> a scalar that reads every output."""
    reps, mtp = model.encode_with_mtp(batch["tokens"], batch["positions"], batch["doc_ids"], batch["structure"])
    return model.predict(reps).square().mean() + sum(model.predict(p.representations).square().mean() for p in mtp)


def _block_inputs(model, batch) -> list[tuple[torch.Tensor, object]]:
    """(x, ctx) as each block receives them in an eager training forward; ctx copied at the call, since the
    context is filled in as the forward goes."""

    def snapshot(ctx):
        return dataclasses.replace(ctx, **{f.name: _copy(getattr(ctx, f.name)) for f in dataclasses.fields(ctx)})

    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach(), snapshot(args[1])))) for layer in model.encoder.layers]
    _train_forward(model, batch)
    for hook in hooks:
        hook.remove()
    return seen


def _copy(value):
    return type(value)(value) if isinstance(value, (dict, list)) else value


def _first_block_of_each_kind(spec: str) -> list[int]:
    arch = load_spec(spec)
    pattern = arch.pattern or list(arch.blocks)
    first = {}
    for i in range(arch.n_layers):
        first.setdefault(pattern[i % len(pattern)], i)
    return list(first.values())


def _routing(model) -> list[torch.Tensor]:
    return [m.stats["tokens_per_expert"].clone() for m in model.modules() if isinstance(m, MoE)]


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_a_block_of_each_kind_traces_into_one_graph_in_training(spec):
    model = _model(spec)
    inputs = _block_inputs(model, _batch(spec, 0))
    for i in _first_block_of_each_kind(spec):
        x, ctx = inputs[i]
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.encoder.layers[i])(x.requires_grad_(), ctx)
        reasons = "\n".join(f"{r.reason}\n  at {''.join(str(f) for f in r.user_stack[-2:])}" for r in explanation.break_reasons)
        assert explanation.graph_break_count == 0, f"block {i} of {spec}:\n{reasons}"
        assert explanation.graph_count == 1


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_blocks_of_one_kind_share_a_graph_and_later_batches_do_not_recompile(spec):
    model = _model(spec)
    for layer in model.encoder.layers:
        layer.compile(backend="eager")
    torch._dynamo.utils.counters.clear()
    _train_forward(model, _batch(spec, 0)).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(_first_block_of_each_kind(spec))
    routing = _routing(model)
    with torch.compiler.set_stance("fail_on_recompile"):  # raises with the failed guard
        for seed in (1, 2):
            _train_forward(model, _batch(spec, seed)).backward()
            assert all(not torch.equal(a, b) for a, b in zip(routing, _routing(model))), "the batches should route differently"


@pytest.mark.parametrize("spec", [s for s in TINY_SPECS if s != "specs/hybrid_tiny.yaml"])
def test_compiled_blocks_compute_the_eager_values_and_gradients(spec):
    """hybrid_tiny is left to the inductor test below: under aot_eager, torch 2.13's CPU softplus backward returns
    other strides than its meta function says, and the Linear backward's view after it fails (Gated DeltaNet's
    decay; a PyTorch bug, not a graph break)."""
    model = _model(spec)
    inputs = _block_inputs(model, _batch(spec, 0))
    for i in _first_block_of_each_kind(spec):
        _assert_compiled_matches_eager(model.encoder.layers[i], *inputs[i], "aot_eager")


@pytest.mark.slow  # inductor compiles a block in 30 to 60 s on two CPU cores
@pytest.mark.parametrize("spec", ["specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml"])
def test_inductor_compiled_block_computes_the_eager_values_and_gradients(spec):
    model = _model(spec)
    x, ctx = _block_inputs(model, _batch(spec, 0))[0]
    _assert_compiled_matches_eager(model.encoder.layers[0], x, ctx, "inductor")


def _assert_compiled_matches_eager(block, x, ctx, backend: str) -> None:
    results = []
    for run in (block, torch.compile(block, backend=backend)):
        torch.manual_seed(1)  # the same dropout masks (where the spec has dropout)
        x_grad = x.clone().requires_grad_()
        y, _ = run(x_grad, ctx)
        results.append((y, torch.autograd.grad(y.square().sum(), [x_grad, *block.parameters()], materialize_grads=True)))
    (y, grads), (y_compiled, grads_compiled) = results
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-5)
    for g, g_compiled in zip(grads, grads_compiled, strict=True):
        torch.testing.assert_close(g_compiled, g, rtol=1e-4, atol=5e-5)

"""The memory plan (`inspect --parallel.* --batch_size N`) against what a real tiny model holds on the CPU:
parameter, gradient and AdamW bytes exactly, and the bytes saved for backward (distinct storages, counted
through saved-tensor hooks) within 10%."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.multiprocessing.reductions import StorageWeakRef

from soma_lightning.cli import main
from soma_lightning.lm import SomaLM
from soma_lightning.nn.moe import MoE
from soma_lightning.parallel.memory_plan import memory_plan
from soma_lightning.parallel.mesh import ParallelDims
from soma_lightning.spec import build_model, load_spec, spec_from_dict

SPECS = ["specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml", "specs/quickstart.yaml", "specs/sosm_tiny.yaml"]
ONE = ParallelDims(1, 1, 1, 1)


def _measured(spec: str, batch_size: int, seq_len: int, autocast: bool) -> dict[str, int]:
    """One AdamW step of a real model: its parameter, gradient and optimizer-state bytes, and the distinct
    storages its training forward saves for backward (parameters excluded)."""
    from soma_lightning.data_modules import ByteCorpus

    cfg = yaml.safe_load(open(spec))
    module = SomaLM(spec_from_dict(cfg["model"]["arch"]))
    annotations = {k: v for k, v in cfg["data"]["init_args"].items() if k in ("doc_ids", "structure")}
    data = ByteCorpus(seq_len=seq_len, batch_size=batch_size, **annotations)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in module.parameters()}
    saved: dict[int, torch.Tensor] = {}  # holding the tensors: a freed storage's address could come back for another

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in params:
            saved[key] = t
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer = torch.optim.AdamW(module.parameters())
    optimizer.step()
    return {
        "parameters": sum(p.numel() * p.element_size() for p in module.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in module.parameters()),
        "optimizer": sum(v.numel() * v.element_size() for state in optimizer.state.values() for k, v in state.items() if k != "step"),
        "saved": sum(t.untyped_storage().nbytes() for t in saved.values()),
    }


@pytest.mark.parametrize("spec", SPECS)
def test_plan_matches_a_real_model_in_float32(spec):
    measured = _measured(spec, batch_size=2, seq_len=64, autocast=False)
    plan = memory_plan(load_spec(spec), ONE, batch_size=2, seq_len=64, precision="32-true", device="cpu")["bytes"]
    for key in ("parameters", "gradients", "optimizer"):
        assert plan[key] == measured[key], key
    assert plan["weight_copies"] == plan["fsdp_buffers"] == 0
    assert plan["activations"] == pytest.approx(measured["saved"], rel=0.1)


@pytest.mark.parametrize("spec", SPECS[:2])
def test_plan_matches_a_real_model_under_bf16_autocast(spec):
    """Autocast's bf16 copies of the weights are saved for backward beside the activations."""
    measured = _measured(spec, batch_size=2, seq_len=64, autocast=True)
    plan = memory_plan(load_spec(spec), ONE, batch_size=2, seq_len=64, precision="bf16-mixed", device="cpu")["bytes"]
    assert plan["parameters"] == measured["parameters"]
    assert plan["activations"] + plan["weight_copies"] == pytest.approx(measured["saved"], rel=0.1)


def test_sharding_divides_dense_parameters_over_fsdp_and_experts_over_ep():
    spec = load_spec("specs/gpt5_moe_tiny.yaml")
    model = build_model(spec, device="meta")
    experts = sum(m.w_in.numel() + m.w_out.numel() for m in model.modules() if isinstance(m, MoE))
    dense = sum(p.numel() for p in model.parameters()) - experts
    plan = memory_plan(spec, ParallelDims(dp_shard=2, ep=2, tp=1, cp=1), batch_size=1, seq_len=64, precision="bf16-true")
    assert plan["gpus"] == 4
    assert plan["bytes"]["parameters"] == pytest.approx(2 * (dense / 4 + experts / 2))
    assert plan["bytes"]["fsdp_buffers"] > 0
    half = memory_plan(spec, ParallelDims(dp_shard=2, ep=2, tp=1, cp=2), batch_size=1, seq_len=64, precision="bf16-true")
    assert half["bytes"]["activations"] == pytest.approx(plan["bytes"]["activations"] / 2)


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    spec = load_spec("specs/gpt5_moe_tiny.yaml")
    full = memory_plan(spec, ONE, batch_size=4, seq_len=128, precision="32-true")["bytes"]["activations"]
    checkpointed = memory_plan(spec, ONE, batch_size=4, seq_len=128, precision="32-true", activation_checkpointing=True)["bytes"]["activations"]
    assert checkpointed < full
    assert checkpointed > spec.n_layers * 4 * 128 * spec.d_model * 4


def test_inspect_prints_the_plan(capsys):
    main(["inspect", "--config", "specs/hybrid_tiny.yaml", "--parallel.ep", "2", "--batch_size", "4", "--seq_len", "64", "--json"])
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["dims"] == {"dp_shard": 1, "tp": 1, "ep": 2, "cp": 1} and plan["gpus"] == 2
    assert plan["bytes"]["total"] == sum(v for k, v in plan["bytes"].items() if k != "total")
    main(["inspect", "--config", "specs/hybrid_tiny.yaml", "--parallel.dp_shard", "2", "--batch_size", "2"])
    out = capsys.readouterr().out
    assert "memory per GPU    2 GPUs (dp_shard 2 x ep 1 x cp 1 x tp 1)" in out and "optimizer" in out


def test_experts_that_ep_does_not_divide_are_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["inspect", "--config", "specs/gpt5_moe_tiny.yaml", "--parallel.ep", "3"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert "--parallel.ep 3: model.arch.blocks.layer[1].ffn.num_experts: 4 experts" in err, err


def test_tensor_parallel_splits_the_experts_and_fsdp2_shards_them_without_ep():
    """tp splits every expert's hidden units (routed and shared; the router stays whole); with ep the experts
    stay out of FSDP2, without it FSDP2 shards them with the rest."""
    arch = {"vocab_size": 264, "d_model": 16, "n_layers": 2,
            "blocks": {"layer": [{"norm": "rmsnorm", "ffn": {"type": "moe", "hidden_dim": 32, "num_experts": 4, "top_k": 2, "num_shared_experts": 1}}]}}
    spec = spec_from_dict(arch)
    model = build_model(spec, device="meta")
    experts = sum(m.w_in.numel() + m.w_out.numel() for m in model.modules() if isinstance(m, MoE))
    shared = sum(m.shared_in.numel() + m.shared_out.numel() for m in model.modules() if isinstance(m, MoE))
    dense = sum(p.numel() for p in model.parameters()) - experts - shared
    per_gpu = lambda **dims: memory_plan(spec, ParallelDims(**dims), batch_size=1, seq_len=16, precision="bf16-true")["parameters_per_gpu"]  # noqa: E731
    assert per_gpu(dp_shard=1, ep=2, tp=2, cp=1) == pytest.approx((dense + shared / 2) / 2 + experts / 4)
    assert per_gpu(dp_shard=2, ep=1, tp=2, cp=1) == pytest.approx((dense + shared / 2 + experts / 2) / 2)
    assert per_gpu(dp_shard=2, ep=1, tp=1, cp=1) == pytest.approx((dense + shared + experts) / 2)


def test_checkpointed_weight_copies_are_one_blocks():
    """Under bf16 autocast with activation checkpointing only the block being recomputed keeps its bf16
    weight copies for backward (and the predictor outside the blocks)."""
    spec = load_spec("specs/gpt5_moe_tiny.yaml")
    plan = lambda ac: memory_plan(spec, ONE, batch_size=1, seq_len=64, activation_checkpointing=ac)["bytes"]["weight_copies"]  # noqa: E731
    model = build_model(spec, device="meta")
    predictor = model.predictor.weight.numel()
    assert plan(True) - 2 * predictor == pytest.approx((plan(False) - 2 * predictor) / spec.n_layers)


@pytest.mark.parametrize("spec", sorted(str(p) for p in Path("specs").glob("*.yaml")))
def test_every_shipped_spec_has_a_plan(spec):
    """The plan traces each spec's training forward on fake tensors, so every component (SOSM's semantic state
    and graph attention, n-gram embeddings, MTP heads, the design scales) must run without real data."""
    plan = memory_plan(load_spec(spec), ONE, batch_size=1, seq_len=256)["bytes"]
    assert plan["parameters"] > 0 and plan["activations"] > 0

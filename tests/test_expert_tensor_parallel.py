"""Tensor parallel inside the MoE experts (nn/tensor_parallel.py's ExpertHiddenParallel) on CPU: 2 gloo
processes with tp=2 against one process, for the MoE layer alone (SwiGLU and GELU, shared experts,
capacity, the chunk routers), and a distributed checkpoint of the split experts read back whole; and
tp=2 x ep=2 over 4 processes for gpt5_moe_tiny and hybrid_tiny. The models under tp=2 alone are in
tests/test_parallel.py."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Shard

from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.moe import MoE
from soma_lightning.parallel.mesh import ParallelDims, batch_rank, build_mesh
from soma_lightning.parallel.parallelize import apply_tensor_parallel
from soma_lightning.spec import spec_from_dict
from test_parallel import EP_SPECS, _arch_and_batch, _compare, _grads, _loss, _reference_and_parallel, _row_separable

LAYERS = {
    "swiglu, shared": dict(num_experts=4, top_k=2, num_shared_experts=2),
    "gelu, shared": dict(num_experts=4, top_k=2, activation="gelu", num_shared_experts=1),
    "swiglu, capacity, aux_free": dict(num_experts=4, top_k=2, capacity_factor=1.0, balance="aux_free"),
    "expert_choice": dict(num_experts=4, top_k=2, routing="expert_choice", routing_chunk=4, num_shared_experts=1),
    "soft": dict(num_experts=4, top_k=1, routing="soft", routing_chunk=4, slots_per_expert=2),
}


def _layer(kwargs: dict) -> MoE:
    torch.manual_seed(0)
    return MoE(16, 24, **kwargs)


def _pass(moe: MoE) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, loss (with the balancing terms) and every parameter's whole gradient."""
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    y = moe(x, SequenceContext(positions=torch.arange(12).expand(2, -1)))
    loss = y.pow(2).mean() + moe.aux_loss
    loss.backward()
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    return y.detach(), loss.detach(), {name: full(p.grad) for name, p in moe.named_parameters()}


def _worker(rank: int, init_file: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = build_mesh(ParallelDims(dp_shard=1, tp=2), "cpu")
    results: dict[str, dict] = {}
    for name, kwargs in LAYERS.items():
        want_y, want_loss, want = _pass(_layer(kwargs))
        tp = _layer(kwargs)
        apply_tensor_parallel(tp, mesh["tp"], None)
        local = {n: p.to_local().shape[-2 if n.endswith("out") else -1] for n, p in tp.named_parameters() if isinstance(p, DTensor)}
        y, loss, grads = _pass(tp)
        results[name] = {
            "output": (y - want_y).abs().max().item(), "loss": abs(loss - want_loss).item(), "local_hidden": local,
            "grads": {n: ((grads[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want},
        }

    one = _layer(LAYERS["swiglu, shared"])
    tp = _layer(LAYERS["swiglu, shared"])
    apply_tensor_parallel(tp, mesh["tp"], None)
    dcp.save(tp.state_dict(), checkpoint_id=f"{folder}/checkpoint")
    torch.manual_seed(1)
    other = MoE(16, 24, **LAYERS["swiglu, shared"])
    apply_tensor_parallel(other, mesh["tp"], None)
    state = other.state_dict()
    dcp.load(state, checkpoint_id=f"{folder}/checkpoint")
    other.load_state_dict(state)
    results["checkpoint"] = {
        "placements": {n: str(p.placements) for n, p in other.named_parameters() if isinstance(p, DTensor)},
        "equal": all(torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, q) for p, q in zip(other.parameters(), one.parameters())),
    }
    if rank == 0:
        Path(f"{folder}/results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("expert_tp")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=2)
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("name", LAYERS)
def test_experts_split_by_hidden_unit_give_one_process_outputs_and_gradients(two_ranks, name):
    """tp=2: each rank holds half of every expert's hidden units (SwiGLU: gate and up columns of the same
    units) and of the shared experts'; the router is whole. Output, loss and every gradient (router, experts,
    shared experts) equal one process's."""
    r = two_ranks[name]
    assert r["output"] < 1e-5 and r["loss"] < 1e-6, r
    assert max(r["grads"].values()) < 1e-5, r
    assert r["local_hidden"]["w_out"] == 12
    assert r["local_hidden"]["w_in"] == (12 if "gelu" in name else 24)


def test_split_experts_checkpoint_as_one_block_per_rank_and_read_back_whole(two_ranks):
    """Stored Shard(2)/Shard(1), one contiguous block per rank (a distributed checkpoint describes each rank's
    shard as one block): saved under tp=2 and loaded into differently initialised split weights, they are
    the one-process weights."""
    r = two_ranks["checkpoint"]
    assert r["placements"]["w_in"] == str((Shard(2),)) and r["placements"]["w_out"] == str((Shard(1),))
    assert r["equal"]


def test_an_expert_hidden_size_that_tp_does_not_divide_names_the_spec_key():
    arch = {
        "d_model": 16, "n_layers": 1,
        "blocks": {"layer": [{"norm": "rmsnorm", "mixer": {"type": "gqa", "num_heads": 4, "num_kv_heads": 4}},
                             {"norm": "rmsnorm", "ffn": {"type": "moe", "hidden_dim": 30, "num_experts": 4, "top_k": 2}}]},
    }
    module = SomaLM(spec_from_dict(arch))
    with pytest.raises(UserError, match=r"^--parallel.tp 4: model.arch.blocks.layer\[1\].ffn.hidden_dim: 30 does not split over tp=4 tensor-parallel ranks$"):
        apply_tensor_parallel(module.model, SimpleNamespace(size=lambda: 4), module.arch)


def _tp_ep_worker(rank: int, init_file: str, out: str) -> None:
    """Rank `rank` of 4 on the mesh ep=2 x tp=2: each ep rank reads one row, its 2 tp ranks the same row."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    mesh = build_mesh(ParallelDims(dp_shard=1, ep=2, tp=2), "cpu")
    results = {}
    for spec in EP_SPECS:
        arch, batch = _arch_and_batch(spec)
        one, want_loss, split = _reference_and_parallel(_row_separable(arch), batch, mesh)
        row = batch_rank(mesh)
        loss = _loss(split, {k: v[row : row + 1] for k, v in batch.items()})
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)  # each row's loss twice, once per tp rank
        meshes = sorted({str(p.device_mesh.mesh_dim_names) for n, p in split.model.named_parameters() if n.endswith(("w_in", "w_out"))})
        results[spec] = {"loss": total.item() / 4, "want": want_loss.item(), "meshes": meshes, **_compare(_grads(split), _grads(one), 1e-5, 1e-6)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_and_expert_parallel_together_give_one_process_loss_and_gradients(tmp_path):
    """tp=2 x ep=2 (4 processes): every expert weight a DTensor on the (ep, tp) mesh, each rank holding 2 of
    the 4 experts' halves; the mean loss and every gradient are one process's on both rows (dropless,
    without balancing losses, as in the ep tests)."""
    out = tmp_path / "results.json"
    mp.spawn(_tp_ep_worker, args=(str(tmp_path / "init"), str(out)), nprocs=4)
    for spec, r in json.loads(out.read_text()).items():
        assert r["meshes"] == [str(("ep", "tp"))], (spec, r)
        assert r["loss"] == pytest.approx(r["want"], rel=1e-5), (spec, r)
        assert r["bad"] == [], (spec, r)

"""Tensor, expert and context parallel on CPU: the `--parallel.*` mesh and its errors, tensor parallel over
2 gloo processes against one process (loss and every gradient; also with compiled blocks), expert parallel
beside data-parallel shards over 4, and runs (V1, MoE) that resume across meshes."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.nn.protocols import auxiliary_terms
from soma_lightning.parallel.mesh import ParallelDims, batch_rank, build_mesh
from soma_lightning.parallel.parallelize import apply_tensor_parallel, check_context_parallel, clip_grad_norm_, context_parallel_step, parallelize
from soma_lightning.spec import spec_from_dict
from conftest import one_error_line, run_config, tiny_v1_arch, train_losses
from test_scale_out import _callbacks, _fit

TP_SPECS = ["v1", "specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml"]
EP_SPECS = ["specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml"]


def _arch_and_annotations(spec: str) -> tuple[dict, dict[str, bool]]:
    """A spec's model mapping and the batch annotations its data section asks for ("v1": tiny V1, none)."""
    if spec == "v1":
        return tiny_v1_arch(d_model=32, hidden_dim=64), {}
    cfg = yaml.safe_load(open(spec))
    return cfg["model"]["arch"], {k: v for k, v in cfg["data"]["init_args"].items() if k in ("doc_ids", "structure")}


def _arch_and_batch(spec: str, rows: int = 2) -> tuple[dict, dict[str, torch.Tensor]]:
    """A spec's model mapping and one training batch of it (`rows` rows of 32 tokens, with the annotations it reads)."""
    from soma_lightning.data_modules import ByteCorpus

    arch, annotations = _arch_and_annotations(spec)
    data = ByteCorpus(seq_len=32, batch_size=rows, **annotations)
    data.setup()
    return arch, next(iter(data.train_dataloader()))


def _loss(module: SomaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the next token and of every MTP horizon, plus the components' auxiliary losses."""
    reps, mtp = module.model.encode_with_mtp(*module._inputs(batch))
    loss = module._ce(module.model.predict(reps), batch["targets"])
    for p in mtp:
        loss = loss + p.loss_weight * module._ce(module.model.predict(p.representations[:, : -p.horizon]), batch["targets"][:, p.horizon :])
    return loss + sum(auxiliary_terms(module.model)[0].values())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _grads(module: SomaLM) -> dict[str, torch.Tensor]:
    return {name: _full(p.grad) for name, p in module.model.named_parameters()}


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, atol: float) -> dict:
    """The parameters whose gradients differ, and the largest difference relative to the largest gradient."""
    assert sorted(got) == sorted(want)
    bad = [name for name in want if not torch.allclose(got[name], want[name], rtol=rtol, atol=atol)]
    worst = max(((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-30)).item() for n in want)
    return {"bad": bad, "worst": worst}


def _old_fsdp2(module: SomaLM, mesh) -> None:
    """FSDP2 as SomaLM.configure_model applied it before `parallelize`: one unit per block, then the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in module.model.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module.model, mesh=mesh)
    for method in ("encode", "encode_with_mtp", "predict"):
        register_fsdp_forward_method(module.model, method)


def _row_separable(arch: dict) -> dict:
    """`arch` with every MoE dropless and without balancing losses: capacity and those losses are not
    functions of each row, so ranks that split a batch would not add up to one process's."""
    arch = json.loads(json.dumps(arch))
    for block in arch["blocks"].values():
        for entry in block:
            if isinstance(entry.get("ffn"), dict) and entry["ffn"].get("type") == "moe":
                entry["ffn"] = entry["ffn"] | {"aux_loss_weight": 0.0, "z_loss_weight": 0.0, "capacity_factor": None}
    return arch


def _worker(rank: int, init_file: str, out: str) -> None:
    """Rank `rank` of 2 gloo processes. For each spec: tp=2 against one process (same batch on both ranks);
    all degrees 1 (dp_shard=2) against FSDP2 as it was applied before `parallelize`, bit for bit; ep=2 (one
    row per rank) against one process on both rows."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tp_mesh = build_mesh(ParallelDims(dp_shard=1, tp=2), "cpu")
    dp_mesh = build_mesh(ParallelDims(dp_shard=2), "cpu")
    ep_mesh = build_mesh(ParallelDims(dp_shard=1, ep=2), "cpu")
    old_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    results: dict[str, dict] = {}

    def fresh(arch: dict) -> SomaLM:
        torch.manual_seed(0)
        return SomaLM(spec_from_dict(arch))

    def run(module: SomaLM, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        loss = _loss(module, batch)
        loss.backward()
        return loss.item(), _grads(module)

    for spec in TP_SPECS:
        arch, batch = _arch_and_batch(spec)
        one = fresh(arch)
        want_loss, want = run(one, batch)

        tp = fresh(arch)
        parallelize(tp.model, tp_mesh, tp.arch)
        loss, grads = run(tp, batch)
        sharded = sum(isinstance(p, DTensor) and p.device_mesh.ndim == 2 for p in tp.model.parameters())
        experts = sum(isinstance(p, DTensor) for n, p in tp.model.named_parameters() if n.endswith(("w_in", "w_out")))
        results[f"tp {spec}"] = {"loss": loss, "want": want_loss, "sharded": sharded, "experts": experts, **_compare(grads, want, 1e-5, 1e-6)}
        checkpointed = fresh(arch)
        parallelize(checkpointed.model, tp_mesh, checkpointed.arch, activation_checkpointing=True)
        loss, grads = run(checkpointed, batch)
        results[f"tp+ac {spec}"] = {"loss": loss, "want": want_loss, **_compare(grads, want, 1e-5, 1e-6)}
        total = clip_grad_norm_(list(tp.model.parameters()), 0.05)
        want_total = torch.nn.utils.clip_grad_norm_(one.model.parameters(), 0.05)
        results[f"clip {spec}"] = {"total": total.item(), "want": want_total.item(), **_compare(_grads(tp), _grads(one), 1e-5, 1e-7)}

        new, old = fresh(arch), fresh(arch)
        parallelize(new.model, dp_mesh, new.arch)
        _old_fsdp2(old, old_mesh)
        loss, grads = run(new, batch)
        old_loss, old_grads = run(old, batch)
        results[f"dp {spec}"] = {"loss": loss, "want": old_loss, **_compare(grads, old_grads, 0, 0)}

        if spec in EP_SPECS:
            arch = _row_separable(arch)
            want_loss, want = run(fresh(arch), batch)
            ep = fresh(arch)
            parallelize(ep.model, ep_mesh, ep.arch)
            loss, grads = run(ep, {k: v[rank : rank + 1] for k, v in batch.items()})
            losses = [torch.zeros(()) for _ in range(2)]
            dist.all_gather(losses, torch.tensor(loss))
            experts = sum(isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == ("ep",) for p in ep.model.parameters())
            results[f"ep {spec}"] = {"loss": torch.stack(losses).mean().item(), "want": want_loss, "experts": experts, **_compare(grads, want, 1e-5, 1e-6)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, dict]:
    """`_worker`'s results, from one launch of 2 processes for all the tests that read them."""
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder / "results.json")), nprocs=2)
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("spec", TP_SPECS)
def test_tensor_parallel_gives_one_process_loss_and_gradients(two_ranks, spec):
    """tp=2 over 2 gloo processes, the model sharded by its components' plans (and FSDP2 over one rank):
    the loss and every parameter's gradient equal one process's, for V1, the MoE family, the hybrid (Gated
    DeltaNet) and SOSM (graph attention). The MoE experts are split by hidden unit (test_expert_tensor_parallel.py)."""
    r = two_ranks[f"tp {spec}"]
    assert r["loss"] == pytest.approx(r["want"], rel=1e-5)
    assert r["bad"] == [], r
    assert r["sharded"] >= 4
    assert (r["experts"] > 0) == (spec in EP_SPECS), r
    r = two_ranks[f"tp+ac {spec}"]  # with activation checkpointing: each block recomputed in backward
    assert r["loss"] == pytest.approx(r["want"], rel=1e-5) and r["bad"] == [], r


@pytest.mark.parametrize("spec", TP_SPECS)
def test_gradient_clipping_over_tensor_parallel_meshes_is_one_processs(two_ranks, spec):
    """Gradients on the FSDP2 mesh and on the 2-D FSDP2 x tp mesh, clipped by one norm: torch's clip_grad_norm_
    on one process."""
    r = two_ranks[f"clip {spec}"]
    assert r["total"] == pytest.approx(r["want"], rel=1e-5) and r["total"] > 0.05
    assert r["bad"] == [], r


@pytest.mark.parametrize("spec", TP_SPECS)
def test_all_degrees_one_is_the_fsdp2_path_bit_for_bit(two_ranks, spec):
    r = two_ranks[f"dp {spec}"]
    assert r["loss"] == r["want"] and r["bad"] == [], r


@pytest.mark.parametrize("spec", EP_SPECS)
def test_expert_parallel_under_parallelize_gives_one_process_gradients(two_ranks, spec):
    """ep=2: each rank reads one row; the experts split over the ranks stay out of FSDP2, the rest is
    sharded over both; the mean loss and every gradient are one process's on both rows."""
    r = two_ranks[f"ep {spec}"]
    assert r["experts"] > 0
    assert r["loss"] == pytest.approx(r["want"], rel=1e-5)
    assert r["bad"] == [], r


def _reference_and_parallel(arch: dict, batch: dict[str, torch.Tensor], mesh, **options) -> tuple[SomaLM, torch.Tensor, SomaLM]:
    """One process's model after the backward of its loss on the whole batch, that loss, and a model with the
    same initial weights that `parallelize` spreads over `mesh` (`options`: its keyword arguments)."""
    torch.manual_seed(0)
    one = SomaLM(spec_from_dict(arch))
    want = _loss(one, batch)
    want.backward()
    torch.manual_seed(0)
    split = SomaLM(spec_from_dict(arch))
    parallelize(split.model, mesh, split.arch, **options)
    return one, want, split


COMPILE_SPECS = ["v1", "specs/gpt5_moe_tiny.yaml"]


def _compile_worker(rank: int, init_file: str, out: str) -> None:
    """Rank `rank` of 2: for each spec, tp=2 with every block compiled (inductor) against one eager process on
    the same batch. An evaluation forward of half the sequence comes first, as Lightning's sanity check runs
    at val_seq_len before training, so the training step compiles for a second shape."""
    from torch._dynamo.utils import counters

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results: dict[str, dict] = {}
    for spec in COMPILE_SPECS:
        # One mesh per model, as a run has: torch 2.13's inductor fails on a model whose DTensors lie on meshes
        # that another model's compiled graph already saw ("device_mesh._get_submesh is not an OpOverload").
        mesh = build_mesh(ParallelDims(dp_shard=1, tp=2), "cpu")
        arch, batch = _arch_and_batch(spec)
        one, want, tp = _reference_and_parallel(arch, batch, mesh, compile=True)
        counters.clear()
        with torch.no_grad():
            _loss(tp, {k: v[:, :16] for k, v in batch.items()})
        loss = _loss(tp, batch)
        loss.backward()
        graphs = counters["stats"]["unique_graphs"]
        results[spec] = {"loss": loss.item(), "want": want.item(), "graphs": graphs, **_compare(_grads(tp), _grads(one), 1e-5, 1e-6)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_with_compiled_blocks_gives_one_process_loss_and_gradients(tmp_path):
    """tp=2 with `--model.compile true` (parallelize compiles each block after sharding it, each input shape
    to its own static graph): the loss and every gradient are one eager process's, for V1 and gpt5_moe_tiny."""
    out = tmp_path / "results.json"
    mp.spawn(_compile_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    for spec, r in json.loads(out.read_text()).items():
        assert r["graphs"] >= 2, (spec, r)  # the evaluation forward's and the training step's
        assert r["loss"] == pytest.approx(r["want"], rel=1e-5), (spec, r)
        assert r["bad"] == [], (spec, r)


def _dp_ep_worker(rank: int, init_file: str, out: str) -> None:
    """Rank `rank` of 4 on the mesh dp_shard=2 x ep=2: each rank reads its own row of 4."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    mesh = build_mesh(ParallelDims(dp_shard=2, ep=2), "cpu")
    arch, batch = _arch_and_batch("specs/gpt5_moe_tiny.yaml", rows=4)
    one, want, ep = _reference_and_parallel(_row_separable(arch), batch, mesh)
    row = batch_rank(mesh)
    loss = _loss(ep, {k: v[row : row + 1] for k, v in batch.items()})
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    meshes = sorted({str(p.device_mesh.mesh_dim_names) for n, p in ep.model.named_parameters() if n.endswith(("w_in", "w_out"))})
    result = {"row": row, "meshes": meshes, **_compare(_grads(ep), _grads(one), 1e-5, 1e-6)}
    per_rank = [None] * 4
    dist.all_gather_object(per_rank, result)
    if rank == 0:
        Path(out).write_text(json.dumps({"loss": total.item() / 4, "want": want.item(), "ranks": per_rank}))
    dist.destroy_process_group()


def test_expert_parallel_beside_data_parallel_shards_gives_one_process_gradients(tmp_path):
    """dp_shard=2 x ep=2 (4 processes, one row each): the experts, split over each ep pair and out of FSDP2,
    have their gradients scaled by 1/ep and averaged over the 2 dp_shard replicas; on every rank the mean
    loss and every gradient are one process's on all 4 rows (dropless, without balancing losses)."""
    out = tmp_path / "results.json"
    mp.spawn(_dp_ep_worker, args=(str(tmp_path / "init"), str(out)), nprocs=4)
    r = json.loads(out.read_text())
    assert r["loss"] == pytest.approx(r["want"], rel=1e-5), r
    assert sorted(rank["row"] for rank in r["ranks"]) == [0, 1, 2, 3]
    for rank in r["ranks"]:
        assert rank["meshes"] == [str(("ep",))], r
        assert rank["bad"] == [], r


def _run(tmp_path: Path, name: str, *args: str, spec: str = "v1") -> subprocess.CompletedProcess:
    """`fit` of run_config's 6-step run on 2 processes under the parallel overlay. A `spec` other than v1 gives
    it that spec's model (its MoEs `_row_separable`) and the batch annotations the spec's data section asks for."""
    config = run_config(tmp_path, name, 6, dropout=0.0)
    if spec != "v1":
        arch, annotations = _arch_and_annotations(spec)
        cfg = yaml.safe_load(config.read_text())
        cfg["model"]["arch"] = _row_separable(arch)
        cfg["data"]["init_args"] |= annotations
        config.write_text(yaml.safe_dump(cfg))
    return _fit("--config", str(config), "--model.sigreg.coefficient", "0", "--trainer.devices", "2", "--config", "specs/strategies/parallel.yaml", *args)


@pytest.mark.slow
def test_a_run_resumes_on_another_mesh_and_continues_its_losses(tmp_path):
    """Sharded checkpoints reshard on load: a run saved under FSDP2 over 2 ranks resumes as tensor parallel
    over 2 ranks, saves, and resumes as FSDP2 again; its losses are those of the run that never stopped
    (the global batch stays 4 rows: 2 per data-parallel rank, or 4 read by both tensor-parallel ranks)."""
    _run(tmp_path, "straight", "--data.init_args.batch_size", "2")
    stop = lambda step: _callbacks(("conftest.StopAtStep", {"step": step}))  # noqa: E731
    _run(tmp_path, "split", "--data.init_args.batch_size", "2", stop(2))
    _run(tmp_path, "split", "--ckpt_path", "last", "--parallel.tp", "2", "--data.init_args.batch_size", "4", stop(4))
    _run(tmp_path, "split", "--ckpt_path", "last", "--data.init_args.batch_size", "2")
    straight = train_losses(tmp_path / "runs/straight/version_0/metrics.csv")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv")
    assert sorted(resumed) == list(range(6))
    assert [resumed[s] for s in range(6)] == pytest.approx([straight[s] for s in range(6)], rel=1e-5)


@pytest.mark.slow
def test_an_moe_run_saved_under_fsdp2_resumes_as_tensor_parallel_and_continues_its_losses(tmp_path):
    """gpt5_moe_tiny saved under FSDP2 over 2 ranks resumes as tensor parallel over 2 ranks, its experts then
    split by hidden unit; its losses are those of the run that never stopped (global batch 4 rows)."""
    moe = "specs/gpt5_moe_tiny.yaml"
    _run(tmp_path, "straight", "--data.init_args.batch_size", "2", spec=moe)
    _run(tmp_path, "split", "--data.init_args.batch_size", "2", _callbacks(("conftest.StopAtStep", {"step": 3})), spec=moe)
    done = _run(tmp_path, "split", "--ckpt_path", "last", "--parallel.tp", "2", "--data.init_args.batch_size", "4", spec=moe)
    assert "tensor parallel over 2 ranks: 4 of 4 block components sharded" in done.stdout + done.stderr
    straight = train_losses(tmp_path / "runs/straight/version_0/metrics.csv")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv")
    assert sorted(resumed) == list(range(6))
    assert [resumed[s] for s in range(6)] == pytest.approx([straight[s] for s in range(6)], rel=1e-5)


def test_parallel_degrees_resolve_against_the_world_size():
    assert ParallelDims(tp=2).resolved(8) == ParallelDims(dp_shard=4, tp=2)
    assert ParallelDims(dp_shard=2, ep=2, cp=2).resolved(8) == ParallelDims(2, 1, 2, 2)
    with pytest.raises(UserError, match=r"^--parallel.dp_shard 2 x --parallel.ep 1 x --parallel.cp 1 x --parallel.tp 2 = 4 must equal the world size 2 "):
        ParallelDims(dp_shard=2, tp=2).resolved(2)
    with pytest.raises(UserError, match=r"^--parallel.ep 1 x --parallel.cp 1 x --parallel.tp 3 = 3 does not divide the world size 4 "):
        ParallelDims(tp=3).resolved(4)
    with pytest.raises(UserError, match=r"^--parallel.cp: must be at least 1, got 0"):
        ParallelDims(cp=0).resolved(4)


def test_mesh_flags_that_do_not_fit_the_devices_are_a_one_line_error(capsys):
    line = one_error_line(capsys, "fit", "--config", "specs/quickstart.yaml", "--trainer.devices", "2", "--parallel.tp", "4")
    assert "--parallel.ep 1 x --parallel.cp 1 x --parallel.tp 4 = 4 does not divide the world size 2 (trainer.devices x trainer.num_nodes)" in line
    line = one_error_line(capsys, "fit", "--config", "specs/quickstart.yaml", "--config", "specs/strategies/ddp.yaml", "--trainer.devices", "2", "--parallel.tp", "2")
    assert "--parallel.*: tensor, expert and context parallel need soma_lightning.strategies.FSDP2Strategy" in line


def test_a_tensor_parallel_degree_that_does_not_split_the_heads_names_the_spec_key():
    """Refused before anything is sharded (no process group is needed to see it)."""
    module = SomaLM(spec_from_dict(tiny_v1_arch(d_model=32, num_heads=4)))
    three_ranks = SimpleNamespace(size=lambda: 3)
    with pytest.raises(UserError, match=r"^--parallel.tp 3: model.arch.blocks.layer\[0\].mixer.num_heads: 4 heads do not split over tp=3 tensor-parallel ranks$"):
        apply_tensor_parallel(module.model, three_ranks, module.arch)
    module = SomaLM(spec_from_dict(tiny_v1_arch(d_model=32, num_heads=4, hidden_dim=30)))
    with pytest.raises(UserError, match=r"^--parallel.tp 4: model.arch.blocks.layer\[1\].ffn.hidden_dim: 30 does not split"):
        apply_tensor_parallel(module.model, SimpleNamespace(size=lambda: 4), module.arch)
    gqa = {"d_model": 24, "n_layers": 1, "blocks": {"layer": [{"norm": "rmsnorm", "mixer": {"type": "gqa", "num_heads": 6, "num_kv_heads": 3}}]}}
    module = SomaLM(spec_from_dict(gqa))
    with pytest.raises(UserError, match=r"^--parallel.tp 2: model.arch.blocks.layer\[0\].mixer.num_kv_heads: 3 heads neither split over nor divide tp=2"):
        apply_tensor_parallel(module.model, SimpleNamespace(size=lambda: 2), module.arch)


def test_context_parallel_refuses_what_ring_attention_cannot_split():
    """Ring attention replaces SDPA's causal kernel only: every refusal is one line naming the key (the
    supported path itself needs CUDA attention kernels and runs in the GPU tests)."""
    check = lambda arch: check_context_parallel((m := SomaLM(spec_from_dict(arch))).model, m.arch)  # noqa: E731
    check(tiny_v1_arch(d_model=32))
    with pytest.raises(UserError, match=r"^model.arch.blocks.layer\[0\].mixer.impl: context parallel \(--parallel.cp\) needs 'sdpa', got 'reference'$"):
        check(tiny_v1_arch(d_model=32, impl="reference"))
    for spec, key in [("specs/gpt5_moe_tiny.yaml", "model.arch.input_embeddings"), ("specs/hybrid_tiny.yaml", "model.arch.mtp"),
                      ("specs/sosm_tiny.yaml", "model.arch.token_embedding")]:
        with pytest.raises(UserError, match=rf"^{key}: context parallel"):
            check(yaml.safe_load(open(spec))["model"]["arch"])
    arch = yaml.safe_load(open("specs/hybrid_tiny.yaml"))["model"]["arch"]
    del arch["mtp"], arch["blocks"]["superblock"][4]
    with pytest.raises(UserError, match=r"^model.arch.blocks.superblock\[0\].mixer: context parallel \(--parallel.cp\) does not support GatedDeltaNet$"):
        check(arch)
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(UserError, match=r"^data.init_args.doc_ids: context parallel \(--parallel.cp\) has the causal mask only"):
        with context_parallel_step(None, {"tokens": tokens, "positions": tokens, "targets": tokens, "doc_ids": tokens}):
            pass


def _context_parallel_worker(rank: int, init_file: str, out: str) -> None:
    """Rank `rank` of 2 on its own GPU: V1's loss and gradients with each sequence split over cp=2, and on one
    process over the whole sequences."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = build_mesh(ParallelDims(dp_shard=1, cp=2), "cuda")
    arch = tiny_v1_arch(d_model=64, num_heads=4, hidden_dim=128)
    tokens = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": torch.arange(64, device="cuda").expand(2, 64)}

    def fresh() -> SomaLM:
        torch.manual_seed(0)
        return SomaLM(spec_from_dict(arch)).cuda()

    one = fresh()
    want = _loss(one, batch)
    want.backward()
    cp = fresh()
    parallelize(cp.model, mesh, cp.arch)
    split = {k: v.clone().contiguous() for k, v in batch.items()}
    with context_parallel_step(mesh, split):
        loss = _loss(cp, split)  # the mean over this rank's chunks: half the tokens
        loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    result = {"loss": total.item() / 2, "want": want.item(), **_compare(_grads(cp), {n: p.grad for n, p in one.model.named_parameters()}, 1e-4, 1e-5)}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="ring attention needs CUDA attention kernels, on 2 GPUs")
def test_context_parallel_gives_one_process_loss_and_gradients(tmp_path):
    """cp=2: each GPU holds half of every sequence (load-balanced chunks) and SDPA runs as ring attention;
    the mean loss and every gradient (FSDP2 averages over the cp ranks) are one process's."""
    out = tmp_path / "results.json"
    mp.spawn(_context_parallel_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    r = json.loads(out.read_text())
    assert r["loss"] == pytest.approx(r["want"], rel=1e-4)
    assert r["bad"] == [], r

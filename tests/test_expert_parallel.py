"""Expert parallelism on CPU: 2 gloo processes with EP=2 against one process running the same two data-parallel
halves with whole experts (EP=1): outputs, losses and every gradient, for the MoE layer alone and for the
gpt5_moe_tiny and hybrid_tiny models (dropless)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.distributed.device_mesh import init_device_mesh

from soma_lightning.errors import UserError
from soma_lightning.lm import SomaLM
from soma_lightning.measure import count_parameters
from soma_lightning.nn.context import SequenceContext
from soma_lightning.nn.moe import MoE
from soma_lightning.parallel.expert_parallel import apply_expert_parallel
from soma_lightning.spec import spec_from_dict

SPECS = ["specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml"]
EP = 2


def _layer() -> MoE:
    """8 experts over 12 assignments per rank: some experts get no rows from a rank."""
    torch.manual_seed(0)
    return MoE(16, 24, num_experts=8, top_k=2, num_shared_experts=1)


def _layer_input() -> torch.Tensor:
    return torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))


def _layer_loss(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = moe(x, SequenceContext(positions=torch.arange(x.shape[1]).expand(x.shape[0], -1)))
    return y, y.pow(2).mean() + moe.aux_loss


def _module(spec: str) -> SomaLM:
    arch = yaml.safe_load(open(spec))["model"]["arch"]
    for sublayers in arch["blocks"].values():
        for entry in sublayers:
            if isinstance(entry.get("ffn"), dict) and entry["ffn"]["type"] == "moe":
                entry["ffn"] = entry["ffn"] | {"capacity_factor": None}
    torch.manual_seed(0)
    return SomaLM(spec_from_dict(arch))


def _batch(spec: str) -> dict[str, torch.Tensor]:
    from soma_lightning.data_modules import ByteCorpus

    annotations = {k: v for k, v in yaml.safe_load(open(spec))["data"]["init_args"].items() if k in ("doc_ids", "structure")}
    data = ByteCorpus(seq_len=32, batch_size=4, **annotations)
    data.setup()
    return next(iter(data.train_dataloader()))


def _half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = len(batch["tokens"]) // EP
    return {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}


def _model_pass(module: SomaLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = module.model(*module._inputs(batch))
    return logits, module.training_step(batch, 0)


def _gathered_gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole gradients: experts' gathered from their shards; the others averaged over ranks (data parallel)."""
    out = {}
    for name, p in module.named_parameters():
        if hasattr(p.grad, "full_tensor"):
            out[name] = p.grad.full_tensor()
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
            out[name] = grad / dist.get_world_size()
    return out


def _gathered(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=EP)
    mesh = init_device_mesh("cpu", (EP,), mesh_dim_names=("ep",))
    results = {}
    moe = _layer()
    apply_expert_parallel(moe, mesh)
    x = _layer_input()
    x = x[rank * 2 : (rank + 1) * 2]
    y, loss = _layer_loss(moe, x)
    loss.backward()
    results["layer"] = {"out": _gathered(y.detach()), "loss": _gathered(loss.detach()[None]), "grads": _gathered_gradients(moe)}
    results["layer"]["shapes"] = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    for spec in SPECS:
        module = _module(spec)
        apply_expert_parallel(module.model, mesh)
        logits, loss = _model_pass(module, _half(_batch(spec), rank))
        loss.backward()
        results[spec] = {
            "out": _gathered(logits), "loss": _gathered(loss.detach()[None]), "grads": _gathered_gradients(module.model),
            "parameters": torch.tensor(count_parameters(module.model)),
        }
    try:
        apply_expert_parallel(MoE(16, 24, num_experts=3), mesh)
    except UserError as e:
        results["error"] = str(e)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def expert_parallel_results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ep")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp / "results.pt")), nprocs=EP)
    return torch.load(tmp / "results.pt", weights_only=True)


def _assert_gradients(got: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    want = {name: p.grad for name, p in module.named_parameters()}
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_expert_parallel_moe_layer_equals_one_device(expert_parallel_results):
    got = expert_parallel_results["layer"]
    moe, x = _layer(), _layer_input()
    outs, losses = [], []
    for rank in range(EP):
        y, loss = _layer_loss(moe, x[rank * 2 : (rank + 1) * 2])
        (loss / EP).backward()
        outs.append(y.detach())
        losses.append(loss.detach())
    torch.testing.assert_close(got["out"], torch.cat(outs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["loss"], torch.stack(losses), rtol=1e-5, atol=1e-5)
    _assert_gradients(got["grads"], moe)
    assert got["shapes"] == {k: tuple(v.shape) for k, v in moe.state_dict().items()}  # whole weights as DTensors


@pytest.mark.parametrize("spec", SPECS)
def test_expert_parallel_model_equals_one_device(expert_parallel_results, spec):
    """Each rank's loss is the mean over its half of the batch, as under data parallelism; EP=1 is one process
    running both halves with whole experts, the gradient of the mean of the two losses."""
    got = expert_parallel_results[spec]
    module, batch = _module(spec), _batch(spec)
    outs, losses = [], []
    for rank in range(EP):
        logits, loss = _model_pass(module, _half(batch, rank))
        (loss / EP).backward()
        outs.append(logits)
        losses.append(loss.detach())
    torch.testing.assert_close(got["out"], torch.cat(outs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["loss"], torch.stack(losses), rtol=1e-5, atol=1e-5)
    _assert_gradients(got["grads"], module.model)
    assert tuple(got["parameters"].tolist()) == count_parameters(module.model)


def test_experts_that_ep_does_not_divide_are_a_one_line_error(expert_parallel_results):
    message = expert_parallel_results["error"]
    assert "\n" not in message
    assert message.startswith("ffn.num_experts: 3 experts") and "ep=2" in message, message

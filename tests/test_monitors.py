"""The monitors: MoE expert load (heatmap PNG, TensorBoard image, JSONL), SOSM graph statistics, gradient and
activation norms per block; each a warning and nothing else on a model without what it monitors."""

import csv
import json

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from soma_lightning.callbacks import BlockNormMonitor
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.lm import SomaLM
from soma_lightning.nn.semantic_graph import EDGE_TYPES
from soma_lightning.spec import spec_from_dict
from conftest import tiny_v1_arch, train_tiny_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _monitor(name: str, every: int) -> dict:
    return {"class_path": f"soma_lightning.callbacks.{name}", "init_args": {"every_n_steps": every}}


def _tensorboard(run) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    return events


def test_expert_load_monitor_writes_counts_heatmaps_and_tensorboard_images(tmp_path):
    with pytest.warns(UserWarning, match="GraphMonitor: the model has no SOSM semantic graph"):
        rows = train_tiny_spec("specs/gpt5_moe_tiny.yaml", tmp_path, steps=4, callbacks=[_monitor("ExpertLoadMonitor", 2), _monitor("GraphMonitor", 2)])
    run = tmp_path / "runs/gpt5_moe_tiny/version_0"
    records = [json.loads(line) for line in (run / "expert_load.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    for r in records:
        assert r["layers"] == ["encoder.layers.0.moe", "encoder.layers.1.moe"]
        # batch 8 x 128 tokens, top-2 of 4 experts: every assignment is counted once, dropped or not
        assert [sum(layer) for layer in r["tokens_per_expert"]] == [8 * 128 * 2] * 2
        assert all(0 <= d < 1 for d in r["dropped_fraction"])
    for step in (0, 2):
        assert (run / f"expert_load/step={step}.png").read_bytes().startswith(PNG_MAGIC)
    assert not (run / "expert_load/step=1.png").exists() and not (run / "graph_stats.jsonl").exists()
    logged = {int(r["step"]): float(r["moe/max_load_1"]) for r in rows if r.get("moe/max_load_1")}
    expected = {r["step"]: max(r["tokens_per_expert"][1]) / (sum(r["tokens_per_expert"][1]) / 4) for r in records}
    assert logged == pytest.approx(expected)
    images = _tensorboard(run).Images("moe/expert_load")
    assert [image.step for image in images] == [0, 2] and images[0].encoded_image_string.startswith(PNG_MAGIC)


def test_graph_monitor_counts_the_sosm_graph(tmp_path):
    with pytest.warns(UserWarning, match="ExpertLoadMonitor: the model has no MoE layers"):
        rows = train_tiny_spec("specs/sosm_tiny.yaml", tmp_path, steps=2, callbacks=[_monitor("GraphMonitor", 1), _monitor("ExpertLoadMonitor", 1)])
    run = tmp_path / "runs/sosm_tiny/version_0"
    records = [json.loads(line) for line in (run / "graph_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and not (run / "expert_load.jsonl").exists()
    b, t, top_k = 8, 64, 4
    fibonacci = [2, 3, 5, 8, 13, 21, 34, 55]  # distances below T = 64
    for r in records:
        per_token = r["edges_per_token"]
        assert list(per_token) == list(EDGE_TYPES)
        assert per_token["self"] == 1.0 and per_token["previous"] == pytest.approx((t - 1) / t)
        assert per_token["fibonacci"] == pytest.approx(sum(t - d for d in fibonacci) / t)
        assert 0 <= per_token["semantic"] <= top_k
        out_hist, in_hist = r["out_degree_hist"], r["in_degree_hist"]
        assert sum(out_hist) == sum(in_hist) == b * t  # one entry per token
        edges = sum(per_token.values()) * b * t
        assert sum(d * n for d, n in enumerate(out_hist)) == pytest.approx(edges)
        assert sum(d * n for d, n in enumerate(in_hist)) == pytest.approx(edges)
    logged = [r for r in rows if r.get("graph/edges_per_token_semantic")]
    assert [float(r["graph/edges_per_token_semantic"]) for r in logged] == pytest.approx([r["edges_per_token"]["semantic"] for r in records])
    histograms = _tensorboard(run).Histograms("graph/in_degree")
    assert [h.step for h in histograms] == [0, 1] and histograms[0].histogram_value.num == b * t


class _Reference(L.Callback):
    """Before each optimizer step: whether the monitor's hooks are in place, and the per-block gradient norms and
    block-output norms recomputed by hand (dropout is 0, weights not yet stepped)."""

    def __init__(self) -> None:
        self.hooked: list[bool] = []
        self.grad: dict[int, list[float]] = {}
        self.activation: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.hooked.append(all(len(layer._forward_hooks) == 1 for layer in pl_module.model.encoder.layers))
        assert all(len(layer._forward_hooks) <= 1 for layer in pl_module.model.encoder.layers)
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        model, step = pl_module.model, trainer.global_step
        self.grad[step] = [torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item() for layer in model.encoder.layers]
        with torch.no_grad():
            ctx = model._context(self.batch["tokens"], self.batch["positions"], None, None)
            x, norms = model.embedding(self.batch["tokens"]), []
            for layer in model.encoder.layers:
                x, _ = layer(x, ctx)
                norms.append(x.norm(dim=-1).mean().item())
        self.activation[step] = norms


def test_block_norm_monitor_matches_norms_computed_by_hand_and_hooks_only_due_steps(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open("soma_lightning/corpora/tinyshakespeare.txt").read()[:20_000])
    monitor, reference = BlockNormMonitor(every_n_steps=2), _Reference()
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="norms")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, callbacks=[monitor, reference], logger=logger, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    model = SomaLM(spec_from_dict(tiny_v1_arch(n_layers=3)))
    trainer.fit(model, ByteCorpus(source=str(corpus), seq_len=32, batch_size=4))
    assert reference.hooked == [True, False, True, False, True]
    rows = [r for r in csv.DictReader(open(tmp_path / "norms/version_0/metrics.csv")) if r.get("blocks/grad_norm_0")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for r in rows:
        step = int(r["step"])
        assert [float(r[f"blocks/grad_norm_{i}"]) for i in range(3)] == pytest.approx(reference.grad[step], rel=1e-5)
        assert [float(r[f"blocks/activation_norm_{i}"]) for i in range(3)] == pytest.approx(reference.activation[step], rel=1e-5)
    assert all(not layer._forward_hooks for layer in model.model.encoder.layers)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_monitors_refuse_a_bad_interval(every):
    with pytest.raises(ValueError, match="every_n_steps: expected a positive integer"):
        BlockNormMonitor(every_n_steps=every)

"""V1 scoring parity with the canonical scorer, replicated from soma-models' own modules (contract 4.3)."""

import json
import subprocess
import sys

import arrgen
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from soma_models.v1.configs import ModelConfig, SIGRegConfig as RefSIGRegConfig
from soma_models.v1.tokenizer import tokenize as ref_tokenize
from soma_models.v1.torch.modules.model import Model as RefModel
from soma_models.v1.torch.modules.sig_reg import SIGReg as RefSIGReg

from soma_lightning import build_model
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.lm import SomaLM
from soma_lightning.onchain import score
from soma_lightning.v1 import WeightsError, model_from_canonical, read_canonical, save_canonical, v1_spec

CONFIGS = {"d16": dict(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4), "d64": dict(embedding_dim=64, pwff_hidden_dim=256, num_layers=1, num_heads=8)}
SIZES = {"1B": 1, "5B": 5, "2048B": 2048, "5000B": 5000, "16x1024B": 16 * 1024, "40000B": 40000}


def replica_score(ref: RefModel, data: bytes, seed: int) -> tuple[float, float, float, np.ndarray]:
    """ModelRunner::eval written with soma-models' tokenizer, model and SIGReg.compute and arrgen noise:
    batches of 16 in data order, global positions, CE with PAD in the denominator, running means."""
    seqs = ref_tokenize(data)
    sig_reg = RefSIGReg(RefSIGRegConfig())
    d = ref.config.embedding_dim
    loss_m = ce_m = sig_m = np.float32(0)
    emb_m = np.zeros(d, dtype=np.float32)
    with torch.no_grad():
        for b, start in enumerate(range(0, len(seqs), 16)):
            rows = seqs[start : start + 16]
            tokens, targets, positions = (torch.tensor([getattr(r, f) for r in rows]) for f in ("token_ids", "targets", "pos_ids"))
            reps = ref.encode(tokens, positions)
            logp = F.log_softmax(ref.predict(reps), dim=-1)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            ce = torch.where(targets == 256, torch.zeros_like(nll), nll).mean()
            noise = torch.from_numpy(arrgen.normal_array(seed + b, [d, 256], 0.0, 1.0))
            sig = sig_reg.compute(reps, noise)
            k = np.float32(b + 1)
            loss_m += (np.float32((ce + sig).item()) - loss_m) / k
            ce_m += (np.float32(ce.item()) - ce_m) / k
            sig_m += (np.float32(sig.item() / 0.02) - sig_m) / k
            emb_m += (reps.mean(1).mean(0).numpy() - emb_m) / k
    return float(loss_m), float(ce_m), float(sig_m), emb_m


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b| / |b| over the whole vector (elements of a mean over positions can be near zero)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference_file(request, tmp_path_factory):
    torch.manual_seed(11)
    ref = RefModel(ModelConfig(dropout_rate=0.0, **CONFIGS[request.param])).eval()
    path = tmp_path_factory.mktemp("w") / f"{request.param}.safetensors"
    ref.save(str(path))
    return ref, path, CONFIGS[request.param]["num_heads"]


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_score_equals_replica_of_canonical_scorer(reference_file, size, seed):
    ref, path, heads = reference_file
    data = bytes(np.random.default_rng(SIZES[size]).integers(0, 256, SIZES[size], dtype=np.uint8))
    ours, embedding = score(model_from_canonical(path, heads), data, seed)
    loss, ce, sig, ref_embedding = replica_score(ref, data, seed)
    for name, a, b in (("loss", ours.loss, loss), ("ce", ours.ce, ce), ("sigreg", ours.sigreg, sig)):
        assert a == pytest.approx(b, rel=1e-5), name
    assert _relative(embedding.numpy(), ref_embedding) < 1e-5
    n = SIZES[size]
    chunks = -(-n // 1024)
    assert ours.n_tokens == n - chunks + (1 if n % 1024 else 0)
    assert ours.n_batches == -(-chunks // 16)


def test_five_bytes_ce_has_pad_in_the_denominator(reference_file):
    ref, path, heads = reference_file
    ours, _ = score(model_from_canonical(path, heads), b"hello")
    model = model_from_canonical(path, heads)
    from soma_lightning.data_modules import tokenize

    rows = tokenize(b"hello")
    logits = model(rows["tokens"], rows["positions"])
    per_token = F.cross_entropy(logits[0, :5], rows["targets"][0, :5])
    assert ours.ce == pytest.approx(per_token.item() * 5 / 1024, rel=1e-5)


def test_round_trip_through_soma_models_is_bitwise(tmp_path):
    ours = build_model(v1_spec(16, 2, 32, num_heads=4))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    save_canonical(ours, tmp_path / "a.safetensors")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    assert len(tensors) == 16 * 2 + 5 and all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["encoder.layers.0.pwff.linear_inner.weight"].shape == (16, 32)
    assert torch.equal(tensors["encoder.layers.1.norm_2.gamma"], ours.encoder.layers[1].norm_2.weight)
    ref = RefModel.load(str(tmp_path / "a.safetensors"), ModelConfig(dropout_rate=0.0, embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4))
    ref.save(str(tmp_path / "b.safetensors"))
    back = model_from_canonical(tmp_path / "b.safetensors", num_heads=4)
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_strict_loading_names_the_key(tmp_path):
    good = build_model(v1_spec(16, 2, 32, num_heads=4))
    save_canonical(good, tmp_path / "w.safetensors")
    tensors = load_file(str(tmp_path / "w.safetensors"))
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != "encoder.layers.1.attention.key.bias"}, "missing canonical key 'encoder.layers.1.attention.key.bias'"),
        "extra": ({**tensors, "encoder.rope_cache": torch.zeros(3)}, "unexpected key 'encoder.rope_cache'"),
        "shape": ({**tensors, "predictor.bias": torch.zeros(7)}, "'predictor.bias' has shape [7], expected [264]"),
        "dtype": ({**tensors, "predictor.bias": torch.zeros(264, dtype=torch.float16)}, "'predictor.bias' has dtype torch.float16, expected F32"),
        "other architecture": ({"tok_embeddings.weight": torch.zeros(10, 4)}, "no 2-D 'embedding.weight'; not a SOMA V1 canonical file"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(WeightsError) as e:
            read_canonical(path)
        assert message in str(e.value), name
        assert str(e.value).startswith(str(path))


def test_export_refuses_a_model_that_is_not_v1():
    arch = v1_spec(16, 1, 32, num_heads=4)
    arch.blocks["layer"][1] = {"norm": "layernorm", "ffn": {"type": "gelu_mlp", "hidden_dim": 32}, "name": "mlp"}
    with pytest.raises(WeightsError, match="not SOMA V1-shaped"):
        save_canonical(build_model(arch), "/tmp/never-written.safetensors")


def test_val_onchain_loss_is_the_score_of_the_val_split(tmp_path):
    val = bytes(np.random.default_rng(3).integers(0, 256, 40_000, dtype=np.uint8))
    (tmp_path / "val.bin").write_bytes(val)
    (tmp_path / "train.bin").write_bytes(val[:5000])
    module = SomaLM(v1_spec(16, 2, 32, num_heads=4), noise_seed=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = ByteCorpus(source=str(tmp_path / "train.bin"), val_source=str(tmp_path / "val.bin"))
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    expected, _ = score(module.model.eval(), val, seed=2)
    assert metrics["val/onchain_loss"] == pytest.approx(expected.loss, rel=1e-5)


def test_init_weights_loads_canonical_file(tmp_path):
    source = build_model(v1_spec(16, 2, 32, num_heads=4))
    save_canonical(source, tmp_path / "w.safetensors")
    module = SomaLM(v1_spec(16, 2, 32, num_heads=4), init_weights=str(tmp_path / "w.safetensors"))
    for (name, a), (_, b) in zip(source.state_dict().items(), module.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(WeightsError, match="has shape"):
        SomaLM(v1_spec(32, 2, 32, num_heads=4), init_weights=str(tmp_path / "w.safetensors"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soma_lightning", *args], capture_output=True, text=True, timeout=300)


def test_score_command(tmp_path, reference_file):
    ref, path, heads = reference_file
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 20)
    out = _cli("score", "--weights", str(path), "--data", str(data), "--seed", "3", "--num-heads", str(heads), "--embedding-out", str(tmp_path / "e.npy"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    loss, ce, sig, embedding = replica_score(ref, data.read_bytes(), 3)
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["n_batches"] == 1 and result["n_tokens"] == 5120 - 5
    assert _relative(np.load(tmp_path / "e.npy"), embedding) < 1e-5
    assert result["embedding_norm"] == pytest.approx(float(np.linalg.norm(embedding)), rel=1e-5)


@pytest.mark.slow
def test_export_command_from_a_run_directory_loads_into_soma_models(tmp_path):
    from soma_lightning.cli import cli_main

    (tmp_path / "corpus.txt").write_text(open("soma_lightning/corpora/tinyshakespeare.txt").read()[:20_000])
    cli_main([
        "fit", "--config", "specs/quickstart.yaml", "--model.arch.d_model", "16", "--model.arch.n_layers", "2",
        "--data.init_args.source", str(tmp_path / "corpus.txt"), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "quickstart"}}),
    ])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    for which in ("best", "last"):
        out = _cli("export", "--ckpt", str(run), "--which", which, "--out", str(tmp_path / f"{which}.safetensors"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["ckpt"].endswith("last.ckpt" if which == "last" else ".ckpt")
    ref = RefModel.load(str(tmp_path / "last.safetensors"), ModelConfig(dropout_rate=0.0, embedding_dim=16, pwff_hidden_dim=512, num_layers=2, num_heads=4))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(ref.encoder.layers[1].pwff.linear_outer.weight, ckpt["state_dict"]["model.encoder.layers.1.pwff.linear_outer.weight"])
    out = _cli("export", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors"))
    assert out.returncode == 2 and "nothing does not exist" in out.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "x.safetensors").write_text("not safetensors at all"), "not a readable safetensors file"),
        (lambda d: (d / "x.safetensors").write_bytes(b""), "not a readable safetensors file"),
        (lambda d: save_file({"w": torch.zeros(2, 2)}, str(d / "x.safetensors")), "not a SOMA V1 canonical file"),
    ],
)
def test_score_bad_weights_are_one_line_errors(tmp_path, make, message):
    make(tmp_path)
    out = _cli("score", "--weights", str(tmp_path / "x.safetensors"), "--data", __file__)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1]


def test_score_truncated_file_and_empty_data(tmp_path):
    save_canonical(build_model(v1_spec(16, 1, 32, num_heads=4)), tmp_path / "w.safetensors")
    blob = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero.bin").write_bytes(b"")
    for weights, data, message in (
        ("cut.safetensors", __file__, "not a readable safetensors file"),
        ("w.safetensors", str(tmp_path / "empty"), "holds no files"),
        ("w.safetensors", str(tmp_path / "zero.bin"), "no data to score"),
    ):
        out = _cli("score", "--weights", str(tmp_path / weights), "--data", data, "--num-heads", "4")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr.strip().splitlines()[-1]


def test_sdpa_attention_scores_within_float_tolerance_of_reference(reference_file):
    _, path, heads = reference_file
    data = bytes(np.random.default_rng(9).integers(0, 256, 5000, dtype=np.uint8))
    exact, _ = score(model_from_canonical(path, heads, attention="reference"), data)
    fast, _ = score(model_from_canonical(path, heads, attention="sdpa"), data)
    assert fast.loss == pytest.approx(exact.loss, rel=1e-4)


def test_score_head_count_that_does_not_split_d_model_is_one_line(reference_file):
    _, path, _ = reference_file
    out = _cli("score", "--weights", str(path), "--data", __file__, "--num-heads", "3")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("soma-lightning: error: --num-heads 3 with d_model") and "not divisible by num_heads 3" in last

"""LoRA fine-tuning through PEFT (callbacks/lora.py): adapters learn a new corpus on a frozen base, merge into
a full export, and parameters freeze by name pattern."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import fresh_checkpoint, run_config, tiny_v1_arch, train_losses

pytest.importorskip("peft")

from soma_lightning.callbacks import LoRA, load_adapter, load_exported, merge_lora  # noqa: E402
from soma_lightning.checkpoints import load_module  # noqa: E402
from soma_lightning.cli import cli_main  # noqa: E402
from soma_lightning.cli.export import export_checkpoint  # noqa: E402
from soma_lightning.errors import UserError  # noqa: E402
from soma_lightning.lm import SomaLM  # noqa: E402
from soma_lightning.spec import spec_from_dict  # noqa: E402

QUICKSTART_ARCH = yaml.safe_load(open("specs/quickstart.yaml"))["model"]["arch"]
TARGETS = r".*(attention\.(query|value)|pwff\.linear_(inner|outer))"
LORA = {"class_path": "soma_lightning.callbacks.LoRA", "init_args": {"target_modules": TARGETS, "r": 8, "alpha": 16}}


def base_export(tmp_path: Path, arch: dict) -> Path:
    """A fresh model of `arch` exported as `soma-lightning export --layout state_dict` writes it."""
    out = tmp_path / "base.safetensors"
    export_checkpoint(str(fresh_checkpoint(tmp_path / "base.ckpt", arch)), str(out), layout="state_dict")
    return out


def fine_tune(tmp_path: Path, base: Path, steps: int) -> Path:
    """The quickstart spec, shrunk, fine-tuned with LoRA from `base` on a repeated sentence; its run directory."""
    corpus = tmp_path / "new_corpus.txt"
    corpus.write_text("the zebra quartz hums at noon. " * 400)
    cfg = yaml.safe_load(open("specs/quickstart.yaml"))
    cfg["model"] |= {"init_weights": str(base), "optim": {"lr": 1e-2, "warmup_steps": 2}}
    cfg["data"]["init_args"] |= {"source": str(corpus), "seq_len": 32, "batch_size": 8, "val_seq_len": 32}
    cfg["trainer"] |= {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
                       "enable_model_summary": False, "callbacks": [LORA],
                       "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "lora"}}}
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(config)])
    return tmp_path / "runs" / "lora" / "version_0"


def test_lora_learns_a_new_corpus_on_a_bitwise_unchanged_base_and_merges(tmp_path):
    base = base_export(tmp_path, QUICKSTART_ARCH)
    run = fine_tune(tmp_path, base, steps=30)
    losses = list(train_losses(run / "metrics.csv").values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses

    base_tensors, spec = load_exported(base)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    adapted = {key.removeprefix("model.").replace(".base_layer", ""): value for key, value in state.items() if key.startswith("model.") and "lora_" not in key}
    assert adapted.keys() == base_tensors.keys()
    assert all(torch.equal(adapted[key], base_tensors[key]) for key in base_tensors)
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in state.items())  # the adapters did train

    model = SomaLM(spec, init_weights=str(base)).model.eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(tokens)
        load_adapter(model, run / "adapter.safetensors")
        adapter_logits = model(tokens)
        merge_lora(model)
        merged_logits = model(tokens)
        loaded_logits = load_module(run).eval()(tokens)  # a LoRA checkpoint loads merged
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded_logits, adapter_logits, atol=1e-5, rtol=0)
    assert model.state_dict().keys() == base_tensors.keys()

    out = tmp_path / "merged.safetensors"
    export_checkpoint(str(run), str(out), which="last", layout="state_dict")
    merged_tensors, _ = load_exported(out)
    assert merged_tensors.keys() == base_tensors.keys()
    torch.testing.assert_close(merged_tensors, {key: value for key, value in model.state_dict().items()}, atol=1e-6, rtol=0)


def test_only_the_adapters_train():
    module = SomaLM(spec_from_dict(tiny_v1_arch()))
    LoRA(target_modules=["query", "value"], r=2).setup(SimpleNamespace(log_dir="unused"), module, "fit")
    trainable = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    assert all("lora_" in name for name in trainable)


def test_freeze_by_pattern_without_lora(tmp_path):
    arch = tiny_v1_arch(d_model=32, hidden_dim=64, dropout=0.0)
    base = base_export(tmp_path, arch)
    config = run_config(tmp_path, "frozen", 4, dropout=0.0, limit_val_batches=0,
                        callbacks=[{"class_path": "soma_lightning.callbacks.LoRA", "init_args": {"freeze": ["embedding.*"]}}])
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["init_weights"] = str(base)
    config.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(config)])
    state = torch.load(tmp_path / "runs" / "frozen" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    before, _ = load_exported(base)
    frozen = [key for key in before if key.startswith("embedding")]
    assert frozen and all(torch.equal(state[f"model.{key}"], before[key]) for key in frozen)
    assert any(not torch.equal(state[f"model.{key}"], before[key]) for key in before if not key.startswith("embedding"))


@pytest.mark.parametrize(("args", "argument"), [({"target_modules": r".*nothing_here"}, "LoRA(target_modules)"), ({"freeze": ["nothing_here.*"]}, "LoRA(freeze)")])
def test_a_pattern_that_matches_nothing_is_one_line_naming_the_argument(args, argument):
    module = SomaLM(spec_from_dict(tiny_v1_arch()))
    with pytest.raises(UserError) as error:
        LoRA(**args).setup(SimpleNamespace(log_dir="unused"), module, "fit")
    assert str(error.value).startswith(f"{argument}: ") and "\n" not in str(error.value)


def test_arguments_are_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match="^LoRA: expected target_modules"):
        LoRA()
    with pytest.raises(ValueError, match="^r: expected a positive integer"):
        LoRA(target_modules="x", r=0)

import subprocess
import sys

import pytest
import yaml

from soma_lightning import SpecError, build_model, load_spec
from soma_lightning.measure import count_parameters
from conftest import tiny_v1_arch

SPECS = "specs"


def test_full_v1_spec_counts_exactly_on_meta():
    model = build_model(load_spec(f"{SPECS}/soma_v1.yaml"), device="meta")
    assert count_parameters(model) == (1_209_684_232, 1_209_684_232)
    assert all(p.is_meta for p in model.parameters())
    keys = list(model.state_dict())
    assert len(keys) == 389
    assert "encoder.layers.23.pwff.linear_outer.bias" in keys
    assert "encoder.layers.0.attention.query.weight" in keys
    assert {"embedding.weight", "final_norm.weight", "final_norm.bias", "predictor.weight", "predictor.bias"} <= set(keys)


def test_quickstart_spec_builds():
    model = build_model(load_spec(f"{SPECS}/quickstart.yaml"))
    assert count_parameters(model)[0] > 0


def test_init_std_draws_linear_and_embedding_weights_from_a_normal():
    import torch

    default = build_model(tiny_v1_arch())
    torch.manual_seed(0)
    normal = build_model(tiny_v1_arch() | {"init_std": 0.02})
    assert default.embedding.weight.std() > 0.5  # nn.Embedding's default is N(0, 1)
    for name, p in normal.named_parameters():
        if "norm" in name:  # norms keep their own init
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.ndim == 2:
            assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.004, name
    assert "model.arch.init_std: must be positive" in _error(tiny_v1_arch() | {"init_std": 0.0})


def _error(arch: dict) -> str:
    with pytest.raises(SpecError) as e:
        build_model(arch)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_mixer_names_path_value_and_choices():
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][0]["mixer"]["type"] = "mhaa"
    msg = _error(arch)
    assert msg.startswith("model.arch.blocks.layer[0].mixer.type:")
    assert "'mhaa'" in msg and "mha" in msg.split("valid:")[1]


def test_unknown_block_in_pattern():
    arch = tiny_v1_arch()
    arch["pattern"] = ["layer", "global"]
    msg = _error(arch)
    assert msg.startswith("model.arch.pattern[1]:") and "'global'" in msg and "valid: layer" in msg


def test_d_model_not_divisible_by_heads():
    msg = _error(tiny_v1_arch(num_heads=3))
    assert msg.startswith("model.arch.blocks.layer[0].mixer.num_heads:") and "16" in msg and "3" in msg


def test_odd_head_dim():
    msg = _error(tiny_v1_arch(d_model=12, num_heads=4))
    assert msg.startswith("model.arch.blocks.layer[0].mixer.num_heads:") and "even" in msg


def test_missing_key():
    arch = tiny_v1_arch()
    del arch["d_model"]
    assert _error(arch) == "model.arch.d_model: missing required key"
    arch = tiny_v1_arch()
    del arch["blocks"]["layer"][1]["ffn"]["hidden_dim"]
    assert _error(arch).startswith("model.arch.blocks.layer[1].ffn.hidden_dim: missing required argument")


def test_wrong_type():
    arch = tiny_v1_arch()
    arch["d_model"] = "wide"
    assert _error(arch) == "model.arch.d_model: expected int, got 'wide'"
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][0]["mixer"]["num_heads"] = 2.5
    assert _error(arch) == "model.arch.blocks.layer[0].mixer.num_heads: expected int, got 2.5"


def test_unknown_argument_and_key():
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][0]["mixer"]["heads"] = 4
    msg = _error(arch)
    assert msg.startswith("model.arch.blocks.layer[0].mixer.heads: unknown argument") and "num_heads" in msg
    arch = tiny_v1_arch()
    arch["widht"] = 3
    assert _error(arch).startswith("model.arch.widht: unknown key; valid keys: d_model")


def test_user_module_by_class_path():
    arch = tiny_v1_arch()
    arch["blocks"]["layer"][1]["ffn"] = {"class_path": "soma_lightning.nn.ffn.GeluMLP", "init_args": {"hidden_dim": 24}}
    model = build_model(arch)
    assert model.encoder.layers[0].pwff.linear_inner.out_features == 24
    arch["blocks"]["layer"][1]["ffn"]["class_path"] = "nowhere.Module"
    assert _error(arch).startswith("model.arch.blocks.layer[1].ffn.class_path: cannot import 'nowhere.Module'")


def test_pattern_cycles_blocks():
    arch = tiny_v1_arch(n_layers=3)
    arch["blocks"]["mixer_only"] = [{"norm": "rmsnorm", "mixer": {"type": "mha", "num_heads": 2}}]
    arch["pattern"] = ["layer", "mixer_only"]
    model = build_model(arch)
    assert [len(layer.order) for layer in model.encoder.layers] == [2, 1, 2]


def test_load_spec_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    arch = tiny_v1_arch()
    arch["n_layers"] = -1
    path.write_text(yaml.safe_dump({"model": {"arch": arch}}))
    with pytest.raises(SpecError, match=r"bad.yaml: model.arch.n_layers: must be positive, got -1"):
        load_spec(str(path))
    with pytest.raises(SpecError, match=r"nope.yaml: cannot read"):
        load_spec(str(tmp_path / "nope.yaml"))


def test_yaml_scientific_floats_are_floats(tmp_path):
    path = tmp_path / "s.yaml"
    text = yaml.safe_dump({"model": {"arch": tiny_v1_arch()}}).replace("norm: layernorm", "norm: {type: layernorm, eps: 1e-6}")
    path.write_text(text)
    model = build_model(load_spec(str(path)))
    assert model.encoder.layers[0].norm_1.eps == 1e-6


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soma_lightning", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.arch.d_model", "abc"], 'Parser key "model.arch.d_model": Expected a <class \'int\'>'),
        (["--data.init_args.source", "/no/such/corpus"], "data.source: '/no/such/corpus' is no file or directory"),
        (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz"),
    ],
)
def test_cli_argument_errors_are_one_line(override, expected):
    out = _cli("fit", "--config", f"{SPECS}/quickstart.yaml", *override)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"soma-lightning: error: {expected}"), out.stderr


def test_cli_spec_error_is_one_line(tmp_path):
    cfg = yaml.safe_load(open(f"{SPECS}/quickstart.yaml"))
    cfg["model"]["arch"]["blocks"]["layer"][0]["mixer"]["num_heads"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in (["fit", "--config", str(path)], ["inspect", "--config", str(path)]):
        out = _cli(*command)
        assert out.returncode == 2, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        error = "model.arch.blocks.layer[0].mixer.num_heads: d_model 128 is not divisible by num_heads 3"
        expected = f"{error} (in {path})" if command[0] == "fit" else f"{path}: {error}"
        assert last == f"soma-lightning: error: {expected}", out.stderr
        assert "Traceback" not in out.stderr


def test_print_config_resolves_the_full_v1_spec():
    out = _cli("fit", "--config", f"{SPECS}/soma_v1.yaml", "--print_config")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["arch"]["d_model"] == 2048 and cfg["model"]["arch"]["n_layers"] == 24
    assert cfg["model"]["sigreg"]["slices"] == 256
    assert cfg["data"]["class_path"] == "soma_lightning.data_modules.ByteCorpus"
    assert cfg["checkpoint"]["monitor"] == "val/loss"


def test_inspect_json():
    import json

    out = _cli("inspect", "--config", f"{SPECS}/soma_v1.yaml", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["total_parameters"] == 1_209_684_232 == info["active_parameters"]
    # 2 * (params in matrices, embedding excluded) + causal attention scores, forward
    matrix_params = 24 * (4 * 2048 * 2048 + 2 * 2048 * 8192) + 2048 * 264
    assert info["forward_flops_per_token"] == 2 * matrix_params + 24 * 4 * 2048 * (1024 + 1) / 2

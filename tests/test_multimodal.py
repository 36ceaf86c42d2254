"""`soma-lightning prepare`, the shards, the mixture sampler, bad inputs and the per-modality validation loss,
on the shipped samples (tests/data) and specs/gpt5_moe_multimodal_tiny.yaml."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from soma_lightning.cli import cli_main, main
from soma_lightning.cli.prepare import prepare_from_spec
from soma_lightning.data_modules.byte_corpus import RandomWindows
from soma_lightning.data_modules.contract import EOS, PAD
from soma_lightning.data_modules.modalities import BadInput, TokenSpace
from soma_lightning.data_modules.modalities import prompt as image_prompt
from soma_lightning.data_modules.shards import LAYOUTS, Shards
from soma_lightning.data_modules.tokenizers import read_wav
from soma_lightning.errors import UserError
from soma_lightning.lm import RangeCE, SomaLM
from soma_lightning.spec import ModelSpec, SpecError
from conftest import tiny_v1_arch, train_losses

TINY = "specs/gpt5_moe_multimodal_tiny.yaml"


def _config(tmp_path: Path, name: str = "mm", max_steps: int = 6, sources: list | None = None, val_every: int | None = None, **data) -> Path:
    """The tiny multimodal spec, shrunk for fast tests, its shards and runs under tmp_path."""
    cfg = yaml.safe_load(open(TINY))
    arch = cfg["model"]["arch"]
    arch |= {"d_model": 32, "max_seq_len": 128}
    arch["blocks"]["layer"][0]["mixer"] |= {"window": 32, "global_stride": 16}
    init = cfg["data"]["init_args"]
    init["sources"][0]["max_documents"] = 400
    if sources is not None:
        init["sources"] = sources
    init |= {"path": str(tmp_path / "shards"), "seq_len": 128, "batch_size": 4, "val_batches": 2, "val_batch_size": 8} | data
    cfg["trainer"] |= {
        "max_steps": max_steps, "val_check_interval": val_every or max_steps, "log_every_n_steps": 1, "enable_progress_bar": False,
        "enable_model_summary": False, "deterministic": True,
    }
    cfg["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "runs"), "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sources(**kinds) -> list[dict]:
    return [dict(v, name=k) for k, v in kinds.items()]


IMAGES = {"kind": "image_label", "path": "tests/data/fashion_mnist/train", "val_path": "tests/data/fashion_mnist/test", "format": "imagefolder"}
SPEECH = {"kind": "audio_transcript", "path": "tests/data/speech", "format": "audiofolder", "val_fraction": 0.2}


def test_prepare_writes_shards_an_index_and_documents_that_decode(tmp_path, capsys):
    main(["prepare", "--config", str(_config(tmp_path))])
    table = capsys.readouterr().out
    assert "fashion_mnist    image_label" in table and "speech           audio_transcript" in table
    shards = Shards.open(str(tmp_path / "shards"))
    index, docs = shards.index, shards.documents()
    assert [s["name"] for s in index["sources"]] == ["shakespeare", "code", "fashion_mnist", "speech"]
    by_source = {s["name"]: s["shards"] for s in index["sources"]}
    assert by_source["fashion_mnist"]["train"]["documents"] == 12 and by_source["fashion_mnist"]["val"]["documents"] == 6  # 6 + 3 images, both orders
    assert by_source["speech"]["train"]["documents"] == 8 and by_source["speech"]["val"]["documents"] == 2
    space = shards.space
    first = {"text": "begin_text", "code": "begin_code", "image_then_label": "begin_image", "label_then_image": "begin_text",
             "audio_then_transcript": "begin_audio", "transcript_then_audio": "begin_text"}
    for i, d in enumerate(docs):
        ids = shards.document(i)
        assert ids[0] == space.marker(first[LAYOUTS[d["layout"]]])
        stream = shards.streams[index["sources"][d["source"]]["name"]][("train", "val")[d["split"]]]
        assert stream[d["offset"] + d["length"]] == EOS
    for name, shard in by_source.items():
        for split in shard:
            assert len(shards.streams[name][split]) == shard[split]["tokens"] == docs[(docs["source"] == list(by_source).index(name)) & (docs["split"] == ("train", "val").index(split))]["length"].sum() + shard[split]["documents"]
    # an image-then-label document decodes to the (resized, quantised) image and its label; a clip to its WAV
    image_doc = int(np.flatnonzero(docs["layout"] == LAYOUTS.index("image_then_label"))[0])
    main(["decode", "--data", str(tmp_path / "shards"), "--document", str(image_doc), "--out", str(tmp_path / "dec")])
    files = json.loads(capsys.readouterr().out)["files"]
    assert [Path(f).name for f in files] == ["00_image.png", "01_text.txt"]
    assert Path(files[1]).read_text() == "Bag"  # imagefolder's first class, first image
    source_png = sorted(Path("tests/data/fashion_mnist/train/Bag").glob("*.png"))[0]
    assert np.array_equal(shards.image.read(files[0]), shards.image.decode(shards.image.encode(shards.image.read(source_png))))
    clip_doc = int(np.flatnonzero(docs["layout"] == LAYOUTS.index("transcript_then_audio"))[0])
    np.save(tmp_path / "clip.npy", shards.document(clip_doc))
    main(["decode", "--data", str(tmp_path / "shards"), "--tokens", str(tmp_path / "clip.npy"), "--out", str(tmp_path / "dec2")])
    text, wav = json.loads(capsys.readouterr().out)["files"]
    samples, rate = read_wav(wav)
    assert rate == 2000 and np.array_equal(shards.audio.encode(samples, rate) , shards.document(clip_doc)[len(Path(text).read_text()) + 3 : -1])


def _bad_corpus(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    shutil.copytree("tests/data/fashion_mnist/train", images)
    (images / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    speech = tmp_path / "speech"
    shutil.copytree("tests/data/speech", speech)
    (speech / "cut.wav").write_bytes((speech / "digits__1.wav").read_bytes()[:2000])
    with open(speech / "metadata.csv", "a") as f:
        f.write("cut.wav,one,0.9\n")
    return images, speech


def test_bad_inputs_are_skipped_loudly_or_fatal(tmp_path, capsys):
    images, speech = _bad_corpus(tmp_path)
    ids = tmp_path / "ids.json"
    ids.write_text("\n".join(json.dumps({"tokens": t}) for t in ([264, 65, 66, 265], [264, 5000, 265], [264, 67, 265])))
    sources = _sources(
        images=IMAGES | {"path": str(images), "val_path": None, "val_fraction": 0.2},
        speech=SPEECH | {"path": str(speech)},
        ids={"kind": "tokens", "path": str(ids), "format": "json", "val_fraction": 0.0},
    )
    cfg = _config(tmp_path, sources=sources, on_bad_input="skip", seq_len=8)
    index = prepare_from_spec(str(cfg))
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png: unreadable image" in err and "cut.wav: corrupt WAV" in err and "token id 5000" in err
    assert [s["skipped"] for s in index["sources"]] == [1, 1, 1]
    assert any("broken.png" in s["reason"] for s in index["skipped"]) and len(index["skipped"]) == 3
    assert index["sources"][2]["shards"]["train"]["documents"] == 2
    with pytest.raises(BadInput, match=r"broken.png: unreadable image .*on_bad_input: fail"):
        prepare_from_spec(str(_config(tmp_path, sources=sources, on_bad_input="fail")))
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--config", str(_config(tmp_path, sources=sources[1:], on_bad_input="fail"))])
    assert e.value.code == 2 and "cut.wav: corrupt WAV" in capsys.readouterr().err


def test_spec_and_shard_mismatches_are_one_line_errors(tmp_path, capsys):
    cfg = _config(tmp_path, sources=_sources(images=IMAGES))
    with pytest.raises(UserError, match=r"holds no prepared corpus \(index.json\); run `soma-lightning prepare"):
        cli_main(["fit", "--config", str(cfg)])
    prepare_from_spec(str(cfg))
    with pytest.raises(SpecError, match=r"model.arch.vocab_ranges: .* differs from the token space"):
        cli_main(["fit", "--config", str(cfg), "--model.arch.vocab_ranges", '{"bytes": [0, 256], "specials": [256, 264], "markers": [264, 280], "image": [280, 1048]}'])
    with pytest.raises(UserError, match=r"data.image: .* differs from the prepared shards'"):
        cli_main(["fit", "--config", str(cfg), "--data.init_args.image.levels", "8"])
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--config", "specs/quickstart.yaml"])
    assert e.value.code == 2 and "prepare needs soma_lightning.data_modules.MultimodalCorpus" in capsys.readouterr().err
    bad_format = _config(tmp_path, sources=_sources(images=IMAGES | {"format": "json"}))
    with pytest.raises(UserError, match=r"data.sources\[0\].format: kind image_label reads imagefolder, got json"):
        prepare_from_spec(str(bad_format))


def test_mixture_follows_the_weights_and_batches_depend_on_the_index_only():
    a, b = np.zeros(1000, dtype=np.uint16), np.ones(50, dtype=np.uint16)  # a short source still gets its share
    windows = RandomWindows([a, b], seq_len=8, batch_size=50, seed=0, weights=[3.0, 1.0])
    rows = torch.cat([windows.batch(i)["tokens"][:, 0] for i in range(80)])
    assert abs((rows == 0).float().mean().item() - 0.75) < 0.03
    resumed = RandomWindows([a, b], seq_len=8, batch_size=50, seed=0, weights=[3.0, 1.0], start_batch=7)
    assert torch.equal(next(iter(resumed))["tokens"], windows.batch(7)["tokens"])
    halves = [RandomWindows([a, b], 8, 25, 0, rank=r, world_size=2, weights=[3.0, 1.0]).batch(3)["tokens"] for r in range(2)]
    assert torch.equal(torch.cat(halves), windows.batch(3)["tokens"])


def test_range_ce_equals_a_plain_loop():
    ranges = {"bytes": [0, 256], "specials": [256, 264], "markers": [264, 280], "image": [280, 536], "audio": [536, 792]}
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 792, (4, 50), generator=g)
    targets[0, :10] = PAD
    targets[targets >= 536] = 300  # no audio target: audio is not reported
    nll = torch.rand(4, 50, generator=g)
    metric = RangeCE(ranges)
    metric.update(nll[:2], targets[:2])
    metric.update(nll[2:], targets[2:])
    got = metric.compute()
    assert set(got) == {"bytes", "specials", "markers", "image"}
    for name, (start, end) in ranges.items():
        picked = [nll[i, j].item() for i in range(4) for j in range(50) if start <= targets[i, j] < end and targets[i, j] != PAD]
        if picked:
            assert abs(got[name].item() - sum(picked) / len(picked)) < 1e-6


def test_v1_models_log_no_per_range_metrics():
    assert SomaLM(ModelSpec(**tiny_v1_arch())).val_range_ce is None


def _val(metrics_csv: Path) -> dict[int, dict[str, float]]:
    return {int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("val/") and v} for r in csv.DictReader(open(metrics_csv)) if r.get("val/ce")}


@pytest.mark.slow
def test_per_modality_validation_losses_fall(tmp_path):
    sources = yaml.safe_load(open(TINY))["data"]["init_args"]["sources"]
    sources[0]["max_documents"], sources[3]["weight"] = 400, 3.0  # audio, the slowest to learn, drawn more often
    cfg = _config(tmp_path, max_steps=30, sources=sources)
    prepare_from_spec(str(cfg))
    cli_main(["validate", "--config", str(cfg)])  # the untrained model
    cli_main(["fit", "--config", str(cfg)])
    before = json.loads((tmp_path / "runs/mm/validate-untrained.json").read_text())
    after = _val(tmp_path / "runs/mm/version_0/metrics.csv")[29]
    for modality in ("bytes", "code", "image", "audio", "markers"):
        assert after[f"val/ce_{modality}"] < before[f"val/ce_{modality}"] - 0.1, modality  # fixed val batches: no noise
        assert abs(after[f"val/bits_per_token_{modality}"] - after[f"val/ce_{modality}"] / np.log(2)) < 1e-4
    assert before["val/ce_image"] > 5.0  # near log(1048) = 6.95 untrained

    # the trained run draws an image for a label prompt: ids of the whole token space (not only bytes), decodable
    out = tmp_path / "sneaker.npy"
    main(["generate", "--ckpt", str(tmp_path / "runs/mm/version_0"), "--prompt", "Sneaker", "--modality", "image",
          "--max-new-tokens", "40", "--temperature", "1.0", "--tokens-out", str(out)])
    ids = np.load(out)
    head = image_prompt(TokenSpace(yaml.safe_load(open(cfg))["model"]["arch"]["vocab_ranges"]), "Sneaker", "image")
    new = ids[len(head) :]
    assert ids[: len(head)].tolist() == head.tolist() and len(new) > 0
    assert (new != PAD).all() and (new < 1048).all() and (new >= 264).any()
    main(["decode", "--data", str(tmp_path / "shards"), "--tokens", str(out), "--out", str(tmp_path / "sneaker")])


@pytest.mark.slow
def test_resume_draws_the_same_batches_and_losses(tmp_path):
    straight = _config(tmp_path, "straight", 6, val_every=3)
    prepare_from_spec(str(straight))
    cli_main(["fit", "--config", str(straight)])
    split = _config(tmp_path, "split", 6, val_every=3)  # last.ckpt is written at the step-3 validation
    stop = {"class_path": "conftest.StopAtStep", "init_args": {"step": 3}}
    cli_main(["fit", "--config", str(split), f"--trainer.callbacks=[{json.dumps(stop)}]"])
    cli_main(["fit", "--config", str(split), "--ckpt_path", "last"])
    a, b = train_losses(tmp_path / "runs/straight/version_0/metrics.csv"), train_losses(tmp_path / "runs/split/version_0/metrics.csv")
    assert b == a and sorted(b) == list(range(6))  # the resumed run continues its directory

"""`soma-lightning prepare --data.source`: text corpora (file trees, JSON lines, parquet, save_to_disk) into
token shards on datatrove; read back with numpy from the shard files."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from soma_lightning.cli import main
from soma_lightning.data_modules import text_pipeline
from soma_lightning.data_modules.contract import EOS
from soma_lightning.data_modules.prepare_text import TextSources, assign, parse_size, prepare_text
from soma_lightning.errors import UserError


def documents(out: Path) -> list[np.ndarray]:
    """Every document of a prepared directory, in manifest order, checking each shard's entry on the way."""
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for shard in manifest["shards"]:
        tokens = np.fromfile(out / "shards" / f"{shard['name']}.bin", dtype=manifest["dtype"])
        starts = np.load(out / "shards" / f"{shard['name']}.docs.npy")
        assert starts[0] == 0 and starts[-1] == len(tokens) == shard["tokens"] and len(starts) == shard["documents"] + 1
        assert hashlib.sha256(tokens.tobytes()).hexdigest() == shard["sha256"]
        docs += [tokens[a:b] for a, b in zip(starts, starts[1:])]
    assert len(docs) == manifest["documents"] and sum(map(len, docs)) == manifest["tokens"]
    return docs


def as_bytes(out: Path) -> list[bytes]:
    return [d.tobytes() for d in documents(out)]


def tree(root: Path, count: int = 12) -> list[bytes]:
    """Files of raw bytes below root (nested, binary, one empty, one in a hidden folder); the non-empty
    visible ones' bytes in path order."""
    contents = {f"d{i % 3}/f{i:02d}.txt": bytes(range(i, 256)) * (i + 1) + "é\n".encode() for i in range(count)}
    contents |= {"d0/empty": b"", "d1/binary.bin": b"\xff\xfe\x00\x80not utf-8", ".git/HEAD": b"hidden"}
    for name, data in contents.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return [contents[name] for name in sorted(contents) if contents[name] and not name.startswith(".")]


def test_a_tree_of_files_is_a_document_of_raw_bytes_per_file(tmp_path):
    expected = tree(tmp_path / "src")
    report = prepare_text(TextSources(str(tmp_path / "src")), tmp_path / "out", workers=1, shard_size=4000)
    assert as_bytes(tmp_path / "out") == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["dtype"], manifest["eos"], manifest["tokenizer"], manifest["skipped"]) == ("uint8", EOS, "bytes", {"empty": 1})
    assert report.examples == {"empty": str(tmp_path / "src" / "d0" / "empty")}
    for shard in manifest["shards"]:  # within shard_size, but for a document larger than it, alone in its shard
        assert shard["tokens"] <= 4000 or shard["documents"] == 1
    assert len(manifest["shards"]) > 3 and all(s["name"].startswith("00000-") for s in manifest["shards"])
    from soma_lightning.data_modules.token_shards import TokenShards

    joined = np.concatenate([np.append(np.frombuffer(d, np.uint8), EOS) for d in expected])
    assert np.array_equal(np.asarray(TokenShards(tmp_path / "out")), joined)  # what training reads


def jsonl(records: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def test_jsonl_zst_gz_and_plain_give_a_document_per_record_and_count_bad_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl.zst").write_bytes(zstandard.compress(jsonl([{"text": "héllo", "id": 1}, {"text": "wörld 🌍"}])))
    (src / "b.jsonl.gz").write_bytes(gzip.compress(jsonl([b'{"text": "bad \xff byte"}', {"text": "third"}, b"{broken", b""])))
    (src / "c.jsonl").write_bytes(jsonl([{"body": "no text"}, {"text": None}, [1, 2], {"text": ""}, {"text": "last"}]))
    report = prepare_text(TextSources(str(src / "*.jsonl*"), "json"), tmp_path / "out", workers=1)
    assert as_bytes(tmp_path / "out") == [t.encode() for t in ("héllo", "wörld 🌍", "third", "last")]
    assert report.manifest.skipped == {
        "empty": 1, "invalid json": 1, "invalid utf-8": 1, "missing text column": 1, "not a json object": 1, "text not a string": 1,
    }
    assert report.examples["invalid utf-8"] == f"{src / 'b.jsonl.gz'}:1" and report.examples["not a json object"] == f"{src / 'c.jsonl'}:3"


@pytest.mark.parametrize("suffix, compress", [(".zst", zstandard.compress), (".gz", gzip.compress)])
def test_a_damaged_file_keeps_the_records_before_the_damage_and_counts_once(tmp_path, suffix, compress):
    rng = np.random.default_rng(0)
    whole = compress(jsonl([{"text": f"record {i} " + rng.bytes(100).hex()} for i in range(5000)]))
    (tmp_path / f"a.jsonl{suffix}").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "b.jsonl").write_bytes(jsonl([{"text": "next file"}]))
    report = prepare_text(TextSources(str(tmp_path / "*.jsonl*"), "json"), tmp_path / "out", workers=1)
    docs = as_bytes(tmp_path / "out")
    assert report.manifest.skipped == {"unreadable file": 1} and report.examples["unreadable file"] == str(tmp_path / f"a.jsonl{suffix}")
    assert 0 < len(docs) - 1 < 5000 and docs[0].startswith(b"record 0 ") and docs[-1] == b"next file"


def test_parquet_and_a_save_to_disk_dataset_give_a_document_per_row(tmp_path):
    import datasets

    texts = [f"row {i} " + "x" * i for i in range(50)] + [None]
    ds = datasets.Dataset.from_dict({"id": list(range(51)), "content": texts})
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    for name, source in (("parquet", TextSources(str(tmp_path / "rows.parquet"), "parquet", "content")), ("saved", TextSources(str(tmp_path / "saved"), text_column="content"))):
        report = prepare_text(source, tmp_path / name, workers=1, tasks=2)
        assert as_bytes(tmp_path / name) == [t.encode() for t in texts[:-1]]
        assert report.manifest.skipped == {"text not a string": 1}


def test_more_workers_give_the_same_documents_and_the_same_manifest_each_time(tmp_path):
    expected = tree(tmp_path / "src", count=20)
    prepare_text(TextSources(str(tmp_path / "src")), tmp_path / "one", workers=1, shard_size=3000)
    for out in ("three", "again"):
        report = prepare_text(TextSources(str(tmp_path / "src")), tmp_path / out, workers=3, shard_size=3000)
        assert as_bytes(tmp_path / out) == as_bytes(tmp_path / "one") == expected  # contiguous ranges keep the path order
        assert {s.name[:5] for s in report.manifest.shards} == {"00000", "00001", "00002"}
    assert (tmp_path / "three" / "manifest.json").read_text() == (tmp_path / "again" / "manifest.json").read_text()


def same_prepare(a: Path, b: Path) -> None:
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    names = sorted(p.name for p in (a / "shards").iterdir())
    assert names == sorted(p.name for p in (b / "shards").iterdir())
    assert all((a / "shards" / n).read_bytes() == (b / "shards" / n).read_bytes() for n in names)


def test_a_prepare_stopped_by_a_failing_task_resumes_to_the_same_shards(tmp_path, monkeypatch):
    tree(tmp_path / "src", count=20)
    source = TextSources(str(tmp_path / "src"))
    prepare_text(source, tmp_path / "clean", tasks=3, shard_size=3000)
    closed, ranks = [], []
    close, run = text_pipeline.ShardFile.close, text_pipeline.ShardWriter.run

    def close_then_fail(self):
        closed.append(self.name)
        shard = close(self)
        if self.name == "00001-00000":
            raise RuntimeError("stopped")
        return shard

    def record_rank(self, data, rank=0, world_size=1):
        ranks.append(rank)
        return run(self, data, rank, world_size)

    monkeypatch.setattr(text_pipeline.ShardFile, "close", close_then_fail)
    monkeypatch.setattr(text_pipeline.ShardWriter, "run", record_rank)
    with pytest.raises(RuntimeError, match="stopped"):
        prepare_text(source, tmp_path / "out", tasks=3, shard_size=3000)
    assert (tmp_path / "out" / "shards" / "00001-00000.bin").is_file() and not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(text_pipeline.ShardFile, "close", close)
    ranks.clear()
    prepare_text(source, tmp_path / "out", tasks=3, shard_size=3000)
    assert ranks == [1, 2]  # task 0 had completed
    same_prepare(tmp_path / "out", tmp_path / "clean")


SLOW_PREPARE = """
import sys, time
from soma_lightning.data_modules import text_pipeline
from soma_lightning.data_modules.prepare_text import TextSources, prepare_text
close = text_pipeline.ShardFile.close
def slow_close(self):
    shard = close(self)
    time.sleep(0.3)
    return shard
text_pipeline.ShardFile.close = slow_close
prepare_text(TextSources(sys.argv[1]), sys.argv[2], workers=2, tasks=4, shard_size=3000)
"""


def test_a_prepare_killed_with_sigkill_resumes_to_the_same_shards(tmp_path):
    tree(tmp_path / "src", count=24)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(tmp_path / "src"), str(out)], start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any((out / ".prepare" / "tasks").glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the prepare and its datatrove workers
    process.wait()
    assert len(list((out / ".prepare" / "tasks").glob("*.json"))) < 4 and not (out / "manifest.json").exists()
    prepare_text(TextSources(str(tmp_path / "src")), out, workers=2, tasks=4, shard_size=3000)
    prepare_text(TextSources(str(tmp_path / "src")), tmp_path / "clean", workers=2, tasks=4, shard_size=3000)
    same_prepare(out, tmp_path / "clean")
    assert not list((out / "shards").glob("*.tmp"))


def bpe_tokenizer(path: Path, vocab_size: int = 400, eos: str = "<|endoftext|>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog", "héllo wörld, code: def f(x): return x"] * 50, trainer)
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_file_gives_its_ids_which_decode_to_the_text(tmp_path):
    from tokenizers import Tokenizer

    texts = ["the quick brown fox", "héllo wörld 🌍 unseen words", "def f(x): return x"]
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"text": t} for t in texts]))
    file = bpe_tokenizer(tmp_path / "bpe.json")
    report = prepare_text(TextSources(str(tmp_path / "a.jsonl"), "json"), tmp_path / "out", tokenizer=str(file))
    tokenizer = Tokenizer.from_file(str(file))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["eos"] == tokenizer.token_to_id("<|endoftext|>")
    assert manifest["tokenizer"] == {"file": "tokenizer.json", "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "vocab_size": tokenizer.get_vocab_size()}
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == file.read_bytes()
    assert [tokenizer.decode(d.tolist()) for d in documents(tmp_path / "out")] == texts and report.manifest.tokens > 0
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "ok.txt").write_text("the lazy dog")
    (tmp_path / "tree" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # bytes a subword tokenizer cannot read
    report = prepare_text(TextSources(str(tmp_path / "tree")), tmp_path / "raw", tokenizer=str(file))
    assert [tokenizer.decode(d.tolist()) for d in documents(tmp_path / "raw")] == ["the lazy dog"] and report.manifest.skipped == {"invalid utf-8": 1}


def test_the_cli_prints_a_summary_and_the_manifest(tmp_path, capsys):
    tree(tmp_path / "src")
    main(["prepare", "--data.source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1", "--shard_size", "4KB"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["documents", "tokens", "shards", "skipped", "input", "MB", "MB/s", "MB/s/worker"]
    assert lines[1].split()[:4] == ["13", f"{sum(map(len, tree(tmp_path / 'again'))):,}", str(len(list((tmp_path / "out" / "shards").glob("*.bin")))), "1"]
    assert lines[2] == f"skipped 1 (empty), the first: {tmp_path / 'src' / 'd0' / 'empty'}"
    assert lines[-1] == f"manifest: {tmp_path / 'out' / 'manifest.json'}"


def cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["prepare", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    return err[-1].removeprefix("soma-lightning: error: ")


def test_cli_errors_are_one_line_naming_the_flag(tmp_path, capsys):
    tree(tmp_path / "src")
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"body": "x"}]))
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text("{}")
    (tmp_path / "hollow").mkdir()
    (tmp_path / "hollow" / "empty.txt").write_bytes(b"")
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    bpe = str(bpe_tokenizer(tmp_path / "bpe.json", eos="</s>"))
    cases = {
        (): "prepare: give --data.source (a text corpus) or --config (a multimodal spec), one of them",
        ("--config", "specs/quickstart.yaml", "--data.source", src): "prepare: give --data.source (a text corpus) or --config (a multimodal spec), not both",
        ("--config", "specs/quickstart.yaml", "--workers", "4"): "--workers: applies to --data.source, not to --config",
        ("--data.source", src): "--out: required with --data.source: the directory the shards go to",
        ("--data.source", src, "--out", out, "--shard_size", "1 XB"): "--shard_size: expected a size such as 1GB, 256MB, 64KiB or 4096 (bytes), got '1 XB'",
        ("--data.source", src, "--out", out, "--workers", "0"): "--workers: must be at least 1, got 0",
        ("--data.source", str(tmp_path / "none*"), "--out", out): f"--data.source: '{tmp_path / 'none*'}' is no file or directory and matches no file as a glob",
        ("--data.source", str(tmp_path / "a.jsonl"), "--data.hf_format", "json", "--out", out): f"--data.text_column: the first record of '{tmp_path / 'a.jsonl'}' has no 'text' (it has body)",
        ("--data.source", str(tmp_path / "dd"), "--out", out): f"--data.source: '{tmp_path / 'dd'}' is a DatasetDict (splits: ); point it at one split's folder",
        ("--data.source", src, "--out", f"{src}/shards"): f"--out: '{src}/shards' is inside --data.source '{src}'; a rerun would read its own shards",
        ("--data.source", str(tmp_path / "hollow"), "--out", str(tmp_path / "o2")): f"--data.source: '{tmp_path / 'hollow'}' holds no documents to prepare (skipped: 1 empty)",
        ("--data.source", src, "--out", out, "--tokenizer", "nope.json"): "--tokenizer: 'nope.json' is neither `bytes` nor a tokenizers JSON file",
        ("--data.source", src, "--out", out, "--tokenizer", bpe): f"--eos_token: '<|endoftext|>' is not a token of '{bpe}'; name its end-of-document token with --eos_token",
    }
    for args, message in cases.items():
        assert cli_error(list(args), capsys) == message, args
    main(["prepare", "--data.source", src, "--out", out, "--workers", "1"])
    assert cli_error(["--data.source", src, "--out", out, "--workers", "2", "--shard_size", "1MB"], capsys) == (
        f"--out: '{out}' holds a prepare with other --workers, --shard_size; rerun with its settings to resume, or remove it to start anew"
    )


def test_sizes_and_the_assignment_of_files_to_tasks():
    assert [parse_size(s) for s in ("1GB", "256MB", "64KiB", "4096", "1.5 GiB")] == [10**9, 256 * 10**6, 65536, 4096, 3 * 2**29]
    for bad in ("", "0", "1XB", "-1GB"):
        with pytest.raises(UserError, match="--shard_size"):
            parse_size(bad)
    assert assign([10, 10, 10, 10], 2) == [0, 2, 4]
    assert assign([100, 1, 1, 1], 2) == [0, 1, 4]  # balanced by bytes, in order
    assert assign([5, 5, 0, 0], 2) == [0, 1, 4]  # trailing empty files still belong to the last task
    assert assign([7], 3) == [0, 1, 1, 1]  # more tasks than files: some read none


SPECS_ON_BYTES = sorted(str(p) for p in Path("specs").glob("*.yaml") if "ByteCorpus" in p.read_text())


@pytest.fixture(scope="module")
def shakespeare_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "shakespeare"
    prepare_text(TextSources("soma_lightning/corpora/tinyshakespeare.txt"), out, workers=1, shard_size=200_000)
    return out


@pytest.mark.parametrize("spec", SPECS_ON_BYTES)
def test_every_byte_spec_reads_prepared_shards_as_its_data(spec, shakespeare_shards):
    """The data section of every spec that trains on bytes takes a prepared directory as its source and gives
    batches of the spec's shape and annotations."""
    import yaml

    from soma_lightning.data_modules import ByteCorpus

    init = yaml.safe_load(open(spec))["data"]["init_args"] | {"source": str(shakespeare_shards)}
    data = ByteCorpus(**init)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == (data.batch_size, data.seq_len)
    assert ("doc_ids" in batch) == bool(init.get("doc_ids")) and ("structure" in batch) == bool(init.get("structure"))
    assert next(iter(data.val_dataloader()))["tokens"].shape[1] == data.val_seq_len


@pytest.mark.parametrize("spec", [s for s in SPECS_ON_BYTES if "tiny" in s or "quickstart" in s])
def test_small_specs_train_from_prepared_shards(spec, shakespeare_shards, tmp_path):
    main(["fit", "--config", spec, "--data.init_args.source", str(shakespeare_shards), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "false"])

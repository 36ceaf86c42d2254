"""Data at pretraining scale, measured on this machine: prepare throughput, a training process's peak memory
over corpora of growing size (prepared shards against ByteCorpus reading a plain folder into RAM), start-up
with many shards, resume far into a run, and loader tokens/s per worker.

    python bench/data.py --linux /work/corpora/linux-source-6.1 --work /work/corpora/bench --out data.json

--linux: an unpacked Linux source tree (`apt-get install linux-source-6.1`, then untar
/usr/src/linux-source-6.1.tar.xz; GPL-2.0, never shipped). The larger corpora are hard links to its files
(a folder of N copies) and to its prepared shards (a manifest listing N copies), so they take no extra
disk: the bytes repeat, which neither loader can tell. Prints a table and writes JSON.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import zstandard

from soma_lightning.data_modules import ByteCorpus
from soma_lightning.data_modules.shard_format import SHARDS, Manifest

H200_V1_TOKENS_PER_S = 65_000  # what one H200 consumes training SOMA V1 (docs/benchmarks.md)
CLI = [sys.executable, "-m", "soma_lightning"]


def run(args: list[str], memory_limit: int | None = None) -> tuple[int, float, float, str, str]:
    """Run a command; its exit status, wall seconds, peak RSS in GB (of the process and the children it
    waited for), its stdout and the tail of its stderr."""
    def limit() -> None:
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(args, stdout=out, stderr=err, text=True, preexec_fn=limit)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return process.returncode, seconds, usage.ru_maxrss / 2**20, out.read(), err.read()[-400:]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def copies(tree: Path, out: Path, n: int) -> Path:
    """A folder of n hard-linked copies of `tree`."""
    if not out.exists():
        for i in range(n):
            shutil.copytree(tree, out / f"copy{i:03d}", copy_function=os.link, symlinks=True)
    return out


def shard_copies(prepared: Path, out: Path, n: int) -> Path:
    """A prepared corpus listing n hard-linked copies of `prepared`'s shards."""
    if not (out / "manifest.json").exists():
        manifest = Manifest.read(prepared)
        (out / SHARDS).mkdir(parents=True)
        shards = []
        for i in range(n):
            for shard in manifest.shards:
                copy = replace(shard, name=f"c{i:04d}-{shard.name}")
                for a, b in zip(shard.paths(prepared), copy.paths(out)):
                    os.link(a, b)
                shards.append(copy)
        replace(manifest, shards=shards).write(out)
    return out


def prepare(source: Path, out: Path, workers: int, *extra: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    code, seconds, _, stdout, err = run([*CLI, "prepare", "--data.source", str(source), "--out", str(out), "--workers", str(workers), *extra])
    assert code == 0, err
    size = du(source) if source.is_dir() else source.stat().st_size
    # prepare's own summary: input MB/s of the pipeline, without the process's start-up (imports)
    header, values = next((line, lines[i + 1]) for lines in [stdout.splitlines()] for i, line in enumerate(lines) if "MB/s/worker" in line)
    pipeline = float(values.split()[header.split().index("MB/s")].replace(",", ""))
    text_mb = Manifest.read(out).tokens / 1e6  # bytes of text written: the input's size when it is not compressed
    return {"source": str(source), "workers": workers, "input_mb": size / 1e6, "text_mb": text_mb, "wall_s": seconds,
            "wall_mb_per_s_per_core": text_mb / seconds / workers, "pipeline_mb_per_s_per_core": text_mb / (size / 1e6 / pipeline) / workers}


def train_rss(source: Path, memory_limit: int) -> dict:
    """Peak RSS of `soma-lightning fit` of the quickstart model, 20 steps, on `source`."""
    args = [*CLI, "fit", "--config", "specs/quickstart.yaml", "--data.init_args.source", str(source), "--trainer.max_steps", "20",
            "--trainer.limit_val_batches", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", tempfile.mkdtemp(prefix="bench_data_")]
    code, seconds, rss, _, err = run(args, memory_limit)
    return {"source": str(source), "ok": code == 0, "seconds": seconds, "peak_rss_gb": rss, "error": None if code == 0 else err.strip().splitlines()[-1:]}


def first_batch_seconds(source: Path, start_batch: int = 0) -> float:
    """ByteCorpus on `source`: setup and the first training batch, at global batch `start_batch`."""
    began = time.perf_counter()
    data = ByteCorpus(source=str(source), seq_len=1024, batch_size=16)
    data.trainer = type("Trainer", (), {"global_step": start_batch, "accumulate_grad_batches": 1, "global_rank": 0, "world_size": 1})()
    data.setup("fit")
    next(iter(data.train_dataloader()))
    return time.perf_counter() - began


def loader_tokens_per_s(source: Path, workers: int, batches: int = 200) -> float:
    data = ByteCorpus(source=str(source), seq_len=1024, batch_size=16, num_workers=workers)
    data.setup("fit")
    it = iter(data.train_dataloader())
    for _ in range(max(2, 2 * workers)):
        next(it)
    began = time.perf_counter()
    tokens = sum(next(it)["tokens"].numel() for _ in range(batches))
    return tokens / (time.perf_counter() - began)


def loader_rows(source: Path) -> list[dict]:
    rows = []
    for workers in (0, 1, 2):
        rate = loader_tokens_per_s(source, workers)
        per_worker = rate / max(workers, 1)
        rows.append({"workers": workers, "tokens_per_s": rate, "per_worker": per_worker, "x_h200_v1": per_worker / H200_V1_TOKENS_PER_S})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linux", required=True, type=Path, help="an unpacked Linux source tree")
    parser.add_argument("--work", required=True, type=Path, help="a folder for the corpora and shards (hard links: same file system as --linux)")
    parser.add_argument("--large-copies", type=int, default=24, help="copies of the Linux tree in the largest corpus")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="address-space limit of each training process")
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    result: dict = {"cpus": os.cpu_count(), "torch": torch.__version__, "linux_mb": du(args.linux) / 1e6}

    # Prepare throughput: raw files (the kernel tree) and jsonl.zst records (tiny Shakespeare paragraphs).
    shakespeare = Path("soma_lightning/corpora/tinyshakespeare.txt").read_text()
    jsonl = work / "shakespeare.jsonl.zst"
    if not jsonl.exists():
        paragraphs = [p for p in shakespeare.split("\n\n") if p.strip()]
        lines = "".join(json.dumps({"text": p, "copy": i}) + "\n" for i in range(300) for p in paragraphs)
        jsonl.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    cores = os.cpu_count() or 1
    result["prepare"] = [
        prepare(args.linux, work / "linux_shards_1", 1) | {"kind": "raw files"},
        prepare(args.linux, work / "linux_shards", cores) | {"kind": "raw files"},
        prepare(jsonl, work / "jsonl_shards", 1, "--data.hf_format", "json") | {"kind": "jsonl.zst"},
    ]
    shutil.rmtree(work / "linux_shards_1")
    # Loader throughput with the shards in the page cache (just written), then again at the end, after the
    # plain 31 GB read has evicted them.
    result["loader_warm"] = loader_rows(work / "linux_shards")

    # Peak RSS of a training process over growing corpora, side by side.
    small = copies(Path("soma_lightning/corpora"), work / "small", 90)  # ~0.1 GB of tiny Shakespeare
    prepare(small, work / "small_shards", cores)
    large = copies(args.linux, work / "large", args.large_copies)
    large_shards = shard_copies(work / "linux_shards", work / "large_shards", args.large_copies)
    limit = int(args.memory_limit_gb * 2**30)
    result["rss"] = []
    for name, plain, prepared in (("0.1 GB", small, work / "small_shards"), ("1.3 GB", args.linux, work / "linux_shards"), (f"{args.large_copies * 1.3:.0f} GB", large, large_shards)):
        result["rss"].append({"corpus": name, "bytes": Manifest.read(prepared).tokens, "plain": train_rss(plain, limit), "prepared": train_rss(prepared, limit)})

    # Start-up with 1,000 shards, resume at step 10^6, loader throughput per worker.
    many = work / "many_shards"
    if not many.exists():
        prepare(args.linux, many, cores, "--shard_size", str(du(args.linux) // 1200))
    result["shards_in_many"] = len(Manifest.read(many).shards)
    result["first_batch_s"] = first_batch_seconds(many)
    result["resume_at_1e6_s"] = first_batch_seconds(large_shards, 10**6)
    result["loader_cold"] = loader_rows(large_shards)

    print("prepare: MB of text written per second and core, over the whole command (wall) and the pipeline alone")
    print(f"{'input':<12} {'workers':>7} {'input MB':>9} {'text MB':>8} {'wall s':>7} {'wall':>6} {'pipeline':>9}")
    for p in result["prepare"]:
        print(f"{p['kind']:<12} {p['workers']:>7} {p['input_mb']:>9,.0f} {p['text_mb']:>8,.0f} {p['wall_s']:>7.1f} {p['wall_mb_per_s_per_core']:>6.1f} {p['pipeline_mb_per_s_per_core']:>9.1f}")
    print(f"\n{'corpus':<8} {'plain RSS GB':>13} {'prepared RSS GB':>16}")
    for r in result["rss"]:
        plain = f"{r['plain']['peak_rss_gb']:.2f}" if r["plain"]["ok"] else "failed"
        print(f"{r['corpus']:<8} {plain:>13} {r['prepared']['peak_rss_gb']:>16.2f}" + ("" if r["plain"]["ok"] else f"   plain: {r['plain']['error']}"))
    print(f"\nfirst batch with {result['shards_in_many']} shards: {result['first_batch_s']:.2f} s; resume at step 10^6: {result['resume_at_1e6_s']:.2f} s")
    for cache in ("warm", "cold"):
        for r in result[f"loader_{cache}"]:
            print(f"loader ({cache} page cache), {r['workers']} workers: {r['tokens_per_s']:,.0f} tokens/s, {r['per_worker']:,.0f} per worker ({r['x_h200_v1']:.0f}x an H200's V1 rate)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

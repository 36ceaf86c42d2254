"""`soma-lightning prepare` for text corpora at scale: files or records -> fixed-size token shards
(shard_format.py), run on datatrove. One machine runs the tasks on a LocalPipelineExecutor (prepare_text);
a cluster runs the same steps as SLURM tasks (plan_prepare, text_pipeline, write_manifest; docs/data.md).

    OUT/.prepare/               datatrove's logging dir (completions/, logs/, stats/) and ours:
        plan.json               the settings a rerun must share to resume
        files.jsonl             the input files in path order, `[path, size]` per line
        tasks/TASK.json         a finished task's shards and skips (text_pipeline.ShardWriter)
    OUT/tokenizer.json          the tokenizer, when one is named
    OUT/shards/, manifest.json  shard_format.py; the manifest is assembled from the task results, last

A killed prepare resumes when rerun with the same settings: datatrove skips the completed tasks, and a task
that did not complete rewrites its own shards.
"""

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules.byte_corpus import DataError, source_files
from soma_lightning.data_modules.shard_format import MANIFEST, SHARDS, Manifest, Shard, dtype_for
from soma_lightning.data_modules.text_pipeline import READERS, UNREADABLE, ShardWriter, file_lines, task_result_path
from soma_lightning.vocabulary import BYTES, DEFAULT_EOS_TOKEN, vocabulary

STATE = ".prepare"
TOKENIZER = "tokenizer.json"
FLAGS = {
    "source": "--data.source", "hf_format": "--data.hf_format", "text_column": "--data.text_column", "tasks": "--workers",
    "shard_size": "--shard_size", "tokenizer": "--tokenizer", "eos": "--eos_token", "files": "input files",
}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class TextSources:
    """The text corpus `prepare` reads.

    Args:
        source: a file, a directory (every file below it outside hidden folders), a glob (quote it) or a
            dataset saved with `datasets`' save_to_disk; files are read in path order.
        hf_format: null: each file is one document of raw bytes; json: JSON lines (plain, .gz, .zst), a
            document per line; parquet: a document per row; arrow: a save_to_disk dataset, a document per
            row (detected by its state.json without this flag).
        text_column: the field or column holding a record's text (json, parquet, arrow).
    """

    source: str | None = None
    hf_format: Literal["json", "parquet", "arrow"] | None = None
    text_column: str = "text"


@dataclass
class Plan:
    """What the tasks of one prepare share: where to write, how documents become tokens, which files each
    task reads (task t: lines bounds[t]:bounds[t + 1] of files.jsonl) and the settings a rerun must match."""

    out: str
    tasks: int
    bounds: list[int]
    task_bytes: list[int]
    hf_format: str | None
    text_column: str
    shard_size: int
    dtype: str
    eos: int
    tokenizer: str | dict
    sources: list[str]
    settings: dict

    @property
    def state_dir(self) -> Path:
        return Path(self.out) / STATE


@dataclass
class Report:
    manifest: Manifest
    path: Path  # of manifest.json
    examples: dict[str, str]  # skip reason -> the first record skipped for it
    seconds: float
    bytes_read: int  # input bytes of the tasks this run ran (the others had completed before)
    workers: int


def parse_size(text: str | int, flag: str = "--shard_size") -> int:
    """Bytes of a size such as 1GB, 256MB, 64KiB or 4096."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match[2].upper() not in UNITS or float(match[1]) * UNITS[match[2].upper()] < 1:
        raise DataError(f"{flag}: expected a size such as 1GB, 256MB, 64KiB or 4096 (bytes), got {text!r}")
    return int(float(match[1]) * UNITS[match[2].upper()])


def input_files(data: TextSources, out: Path) -> tuple[list[Path], str | None]:
    """The files to read, in path order, and their format (arrow for a save_to_disk dataset)."""
    path = Path(data.source)
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"--data.source: {data.source!r} is a DatasetDict (splits: {', '.join(splits)}); point it at one split's folder")
    if (path / "state.json").is_file() and data.hf_format in (None, "arrow"):
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state["_data_files"]], "arrow"
    if data.hf_format == "arrow":
        raise DataError(f"--data.source: {data.source!r} is not a dataset saved with save_to_disk (it has no state.json)")
    files = source_files(data.source, "--data.source")
    if path.is_dir():
        if out.resolve().is_relative_to(path.resolve()):
            raise DataError(f"--out: {str(out)!r} is inside --data.source {data.source!r}; a rerun would read its own shards")
        files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(path).parts)]
    return files, data.hf_format


def first_record_columns(file: Path, hf_format: str | None) -> list[str] | None:
    """The fields of the first file's first record (None: raw files, or a first record that cannot be read:
    the tasks count it)."""
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if hf_format == "json":
            row = orjson.loads(next((line for line in file_lines(str(file)) if line.strip()), b""))
            return list(row) if isinstance(row, dict) else None
        if hf_format == "parquet":
            return pq.read_schema(file).names
        if hf_format == "arrow":
            with pa.memory_map(str(file)) as source:
                return pa.ipc.open_stream(source).schema.names
    except UNREADABLE:
        pass
    return None


def encoding(tokenizer: str, eos_token: str) -> tuple[str, int, str | dict, Path | None]:
    """(dtype, EOS id, the manifest's tokenizer entry, the tokenizer file) for --tokenizer and --eos_token."""
    vocab = vocabulary(tokenizer, eos_token, "--tokenizer", DataError)
    if vocab.is_bytes:
        return "uint8", vocab.eos, BYTES, None
    return str(dtype_for(vocab.size)), vocab.eos, {"file": TOKENIZER, "sha256": vocab.sha256, "vocab_size": vocab.size}, Path(tokenizer)


def assign(sizes: list[int], tasks: int) -> list[int]:
    """Cut the files, in order, into `tasks` contiguous ranges of about equal bytes: task t reads files
    bounds[t] to bounds[t + 1] (a task may get none)."""
    starts = np.cumsum([0, *sizes[:-1]], dtype=np.int64)
    owner = np.minimum(starts * tasks // max(sum(sizes), 1), tasks - 1)  # trailing empty files start at the total
    return np.searchsorted(owner, np.arange(tasks + 1), side="left").tolist()


def plan_prepare(
    data: TextSources, out: str | Path, tasks: int, shard_size: int = 10**9, tokenizer: str = BYTES, eos_token: str = DEFAULT_EOS_TOKEN,
) -> Plan:
    """Check the settings, list and assign the files, and record the plan in OUT/.prepare (or check it
    against the one there: a rerun with other settings is refused rather than mixed with old shards)."""
    if not data.source:
        raise DataError("--data.source: required: the files to prepare")
    if tasks < 1:
        raise DataError(f"--workers: must be at least 1, got {tasks}")
    if shard_size < 1:
        raise DataError(f"--shard_size: must be positive, got {shard_size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {str(out)!r} is a file, not a directory")
    files, hf_format = input_files(data, out)
    columns = first_record_columns(files[0], hf_format)
    if columns is not None and data.text_column not in columns:
        raise DataError(f"--data.text_column: the first record of {str(files[0])!r} has no {data.text_column!r} (it has {', '.join(columns) or 'no fields'})")
    dtype, eos, tokenizer_entry, tokenizer_file = encoding(tokenizer, eos_token)
    sizes = [f.stat().st_size for f in files]
    listing = "".join(json.dumps([str(f), size]) + "\n" for f, size in zip(files, sizes))  # ASCII: json escapes the rest
    digest = hashlib.sha256(listing.encode()).hexdigest()
    settings = {
        "source": data.source, "hf_format": hf_format, "text_column": data.text_column, "tasks": tasks, "shard_size": shard_size,
        "tokenizer": tokenizer_entry, "eos": eos, "files": f"{len(files)} files, sha256 {digest}",
    }
    bounds = assign(sizes, tasks)
    plan = Plan(str(out), tasks, bounds, [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])], hf_format, data.text_column, shard_size, dtype, eos, tokenizer_entry, [data.source], settings)
    plan_file = plan.state_dir / "plan.json"
    if plan_file.is_file():
        before = json.loads(plan_file.read_text())
        if before != settings:
            changed = ", ".join(FLAGS[k] for k in settings if before.get(k) != settings[k])
            raise DataError(f"--out: {str(out)!r} holds a prepare with other {changed}; rerun with its settings to resume, or remove it to start anew")
        return plan
    atomic_write(plan.state_dir / "files.jsonl", lambda tmp: tmp.write_text(listing))
    if tokenizer_file is not None:
        atomic_write(out / TOKENIZER, lambda tmp: shutil.copyfile(tokenizer_file, tmp))
    atomic_write(plan_file, lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n"))
    return plan


def text_pipeline(plan: Plan) -> list:
    """The datatrove pipeline of one task: the format's reader, then ShardWriter; run it with
    tasks=plan.tasks and logging_dir=plan.state_dir on any datatrove executor."""
    reader = READERS[plan.hf_format](str(plan.state_dir / "files.jsonl"), plan.bounds, plan.text_column)
    tokenizer_file = str(Path(plan.out) / TOKENIZER) if isinstance(plan.tokenizer, dict) else None
    return [reader, ShardWriter(plan.out, str(plan.state_dir), plan.shard_size, plan.dtype, tokenizer_file)]


def write_manifest(plan: Plan) -> tuple[Manifest, dict[str, str]]:
    """Assemble OUT/manifest.json from the task results, in task order (so the corpus is the files in path
    order); returns it with the first record skipped per reason."""
    shards, skipped, examples = [], {}, {}
    for rank in range(plan.tasks):
        path = task_result_path(plan.state_dir, rank)
        if not path.is_file():
            raise DataError(f"--out: task {rank} of {plan.tasks} has not finished ({path} is missing); rerun prepare to resume")
        result = json.loads(path.read_text())
        shards += [Shard(**s) for s in result["shards"]]
        for reason, count in result["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
            examples.setdefault(reason, result["examples"][reason])
    for leftover in (Path(plan.out) / SHARDS).glob("*.tmp"):  # from a task killed while writing
        leftover.unlink()
    manifest = Manifest(plan.dtype, plan.eos, plan.tokenizer, shards, dict(sorted(skipped.items())), plan.sources)
    if not manifest.documents:
        skips = ", ".join(f"{count} {reason}" for reason, count in manifest.skipped.items()) or "none"
        raise DataError(f"--data.source: {plan.sources[0]!r} holds no documents to prepare (skipped: {skips})")
    manifest.write(Path(plan.out))
    return manifest, examples


def prepare_text(
    data: TextSources, out: str | Path, workers: int = 1, shard_size: int = 10**9, tokenizer: str = BYTES, eos_token: str = DEFAULT_EOS_TOKEN,
    tasks: int | None = None,
) -> Report:
    """Prepare `data` into token shards in `out` with `tasks` (default: `workers`) datatrove tasks, `workers`
    at a time on this machine; resumes a prepare of the same settings that was stopped."""
    from datatrove.executor import LocalPipelineExecutor

    plan = plan_prepare(data, out, tasks or workers, shard_size, tokenizer, eos_token)
    # fork, not datatrove's default forkserver: a fresh process would spend seconds importing the package (torch, Lightning)
    executor = LocalPipelineExecutor(
        text_pipeline(plan), tasks=plan.tasks, workers=min(workers, plan.tasks), logging_dir=str(plan.state_dir), start_method="fork",
    )
    pending = executor.get_incomplete_ranks()
    start = time.perf_counter()
    executor.run()
    seconds = time.perf_counter() - start
    manifest, examples = write_manifest(plan)
    return Report(manifest, Path(out) / MANIFEST, examples, seconds, sum(plan.task_bytes[r] for r in pending), min(workers, plan.tasks))

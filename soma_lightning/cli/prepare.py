"""`soma-lightning prepare`: a text corpus (--data.source) or a multimodal spec's sources (--config) into
memory-mapped shards."""

import os

import jsonargparse

from soma_lightning.config_files import read_yaml
from soma_lightning.data_modules.multimodal import MultimodalCorpus
from soma_lightning.data_modules.prepare import prepare_corpus
from soma_lightning.data_modules.prepare_text import Report, TextSources, parse_size, prepare_text
from soma_lightning.errors import SpecError, UserError
from soma_lightning.spec import load_spec


def multimodal_corpus(config: str, **overrides) -> MultimodalCorpus:
    """The MultimodalCorpus of a spec's data section, with some init args overridden."""
    data = read_yaml(config).get("data") or {}
    if not str(data.get("class_path", "")).endswith("MultimodalCorpus"):
        raise SpecError(f"{config}: data.class_path: prepare needs soma_lightning.data_modules.MultimodalCorpus, got {data.get('class_path')!r}")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultimodalCorpus, "data")
    try:
        return parser.instantiate(parser.parse_object({"data": dict(data.get("init_args") or {}) | overrides})).data
    except jsonargparse.ArgumentError as e:
        raise SpecError(f"{config}: data.init_args: {' '.join(str(e).split())}") from None


def prepare_from_spec(config: str, out: str | None = None) -> dict:
    """Tokenise the sources of a spec whose data module is MultimodalCorpus into memory-mapped shards (in
    `out`, default data.init_args.path), in the token space of its model.arch.vocab_ranges."""
    spec = load_spec(config)
    return prepare_corpus(multimodal_corpus(config, **({"path": out} if out else {})), spec.vocab_ranges, out)


def print_report(report: Report) -> None:
    m, mb = report.manifest, report.bytes_read / 1e6
    rate = mb / report.seconds if report.seconds > 0 else 0.0
    print(f"{'documents':>12} {'tokens':>15} {'shards':>7} {'skipped':>9} {'input MB':>10} {'MB/s':>8} {'MB/s/worker':>12}")
    print(f"{m.documents:>12,} {m.tokens:>15,} {len(m.shards):>7,} {sum(m.skipped.values()):>9,} {mb:>10,.1f} {rate:>8,.1f} {rate / report.workers:>12,.1f}")
    for reason, count in m.skipped.items():
        print(f"skipped {count:,} ({reason}), the first: {report.examples[reason]}")
    print(f"manifest: {report.path}")


def prepare(
    config: str | None = None, out: str | None = None, data: TextSources = TextSources(), workers: int | None = None,
    shard_size: str = "1GB", tokenizer: str = "bytes", eos_token: str = "<|endoftext|>",
) -> None:
    """Prepare a corpus as memory-mapped token shards: a text corpus (--data.source), in fixed-size shards
    written by datatrove tasks, or a multimodal spec's sources (--config).

    Text: prints documents, tokens, shards, skipped records and MB/s; a stopped prepare resumes when rerun
    with the same flags. Multimodal: the sources of its data module (MultimodalCorpus), in the token space
    of its model.arch.vocab_ranges; prints documents and tokens per source and split.

    Args:
        config: a spec with model.arch.vocab_ranges and data: MultimodalCorpus (not with --data.source)
        out: the shard directory (required with --data.source; with --config, default: data.init_args.path)
        data: the text corpus (not with --config)
        workers: datatrove tasks, run that many at a time (default: this machine's cores); the same
            inputs and workers give the same shards
        shard_size: the size a shard's tokens stay within, e.g. 1GB, 256MB (a larger document gets a shard
            of its own)
        tokenizer: bytes (raw bytes, uint8), or a HF tokenizers JSON file (ids as uint16 or uint32)
        eos_token: with a tokenizer file, its end-of-document token
    """
    if (config is None) == (data.source is None):
        raise UserError("prepare: give --data.source (a text corpus) or --config (a multimodal spec), " + ("not both" if config else "one of them"))
    if config is not None:
        text_flags = [flag for flag, given in (("--workers", workers is not None), ("--shard_size", shard_size != "1GB"), ("--tokenizer", tokenizer != "bytes")) if given]
        if text_flags:
            raise UserError(f"{text_flags[0]}: applies to --data.source, not to --config")
        return prepare_multimodal(config, out)
    if out is None:
        raise UserError("--out: required with --data.source: the directory the shards go to")
    workers = workers if workers is not None else len(os.sched_getaffinity(0))
    print_report(prepare_text(data, out, workers, parse_size(shard_size), tokenizer, eos_token))


def prepare_multimodal(config: str, out: str | None) -> None:
    index = prepare_from_spec(config, out)
    print(f"{'source':<16} {'kind':<17} {'train docs':>10} {'train tokens':>13} {'val docs':>9} {'val tokens':>11} {'skipped':>8}")
    for s in index["sources"]:
        train, val = s["shards"].get("train", {}), s["shards"].get("val", {})
        print(f"{s['name']:<16} {s['kind']:<17} {train.get('documents', 0):>10,} {train.get('tokens', 0):>13,} {val.get('documents', 0):>9,} {val.get('tokens', 0):>11,} {s['skipped']:>8}")
    for skip in index["skipped"]:
        print(f"skipped ({skip['source']}): {skip['reason']}")

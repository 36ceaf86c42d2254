"""`soma-lightning prepare`: tokenise a multimodal spec's sources into memory-mapped shards."""

import jsonargparse

from soma_lightning.config_files import read_yaml
from soma_lightning.data_modules.multimodal import MultimodalCorpus
from soma_lightning.data_modules.prepare import prepare_corpus
from soma_lightning.errors import SpecError
from soma_lightning.spec import load_spec


def multimodal_corpus(config: str, **overrides) -> MultimodalCorpus:
    """The MultimodalCorpus of a spec's data section, with some init args overridden."""
    data = read_yaml(config).get("data") or {}
    if not str(data.get("class_path", "")).endswith("MultimodalCorpus"):
        raise SpecError(f"{config}: data.class_path: prepare needs soma_lightning.data_modules.MultimodalCorpus, got {data.get('class_path')!r}")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultimodalCorpus, "data")
    try:
        return parser.instantiate_classes(parser.parse_object({"data": dict(data.get("init_args") or {}) | overrides})).data
    except jsonargparse.ArgumentError as e:
        raise SpecError(f"{config}: data.init_args: {' '.join(str(e).split())}") from None


def prepare_from_spec(config: str, out: str | None = None) -> dict:
    """Tokenise the sources of a spec whose data module is MultimodalCorpus into memory-mapped shards (in
    `out`, default data.init_args.path), in the token space of its model.arch.vocab_ranges."""
    spec = load_spec(config)
    return prepare_corpus(multimodal_corpus(config, **({"path": out} if out else {})), spec.vocab_ranges, out)


def prepare(config: str, out: str | None = None) -> None:
    """Tokenise a multimodal spec's sources into memory-mapped shards: those of its data module
    (MultimodalCorpus), in the token space of its model.arch.vocab_ranges; prints documents and tokens per
    source and split.

    Args:
        config: a spec with model.arch.vocab_ranges and data: MultimodalCorpus
        out: the shard directory (default: data.init_args.path)
    """
    index = prepare_from_spec(config, out)
    print(f"{'source':<16} {'kind':<17} {'train docs':>10} {'train tokens':>13} {'val docs':>9} {'val tokens':>11} {'skipped':>8}")
    for s in index["sources"]:
        train, val = s["shards"].get("train", {}), s["shards"].get("val", {})
        print(f"{s['name']:<16} {s['kind']:<17} {train.get('documents', 0):>10,} {train.get('tokens', 0):>13,} {val.get('documents', 0):>9,} {val.get('tokens', 0):>11,} {s['skipped']:>8}")
    for skip in index["skipped"]:
        print(f"skipped ({skip['source']}): {skip['reason']}")

"""Generation from models trained on the ids of a tokenizer file: emittable ids, EOS, cache (growing and
static) against recompute, speculative decoding, sampling and the repetition penalty on subword ids, traces showing text pieces, the
byte constraints refused, and the `generate` command's wiring of the vocabulary."""

import json
import types

import pytest
import torch
import yaml

from soma_lightning import build_model
from soma_lightning.cli import generate as generate_command
from soma_lightning.cli import main
from soma_lightning.errors import UserError
from soma_lightning.generation import generate, sampling
from soma_lightning.generation.constraints import AllowedTokens, FactVocabulary, LogitsProcessor, RegexConstraint, RepetitionPenalty
from soma_lightning.spec import spec_from_dict
from soma_lightning.vocabulary import BYTE_VOCABULARY, Vocabulary, vocabulary
from test_prepare_text import bpe_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog, héllo wörld, code: def f(x): return x"
UNUSED = 8  # ids past PAD that the model has and the tokenizer never produces


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocabulary:
    return vocabulary(str(bpe_tokenizer(tmp_path_factory.mktemp("tokenizer") / "bpe.json")))


def _model(spec: str, vocab: Vocabulary, favour: dict[int, float] | None = None):
    """`spec`'s model with room for `vocab`'s ids, PAD and UNUSED more; `favour`: logits raised by so much
    per id (the main head's and the MTP heads', which share the predictor)."""
    raw = yaml.safe_load(open(spec))["model"]["arch"] | {"vocab_size": vocab.pad + 1 + UNUSED}
    torch.manual_seed(0)
    model = build_model(spec_from_dict(raw)).eval()
    if favour:
        boost = torch.zeros(raw["vocab_size"]).index_put_((torch.tensor(list(favour)),), torch.tensor(list(favour.values())))
        model.predictor.register_forward_hook(lambda module, args, out: out + boost)
    return model


def _prompt(vocab: Vocabulary, batch: int = 2, length: int = 12) -> torch.Tensor:
    ids = vocab.encode(TEXT)
    return torch.tensor([ids[i : i + length] for i in range(batch)])


@pytest.mark.parametrize("spec", ["specs/quickstart.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml"])
def test_subword_greedy_with_the_cache_equals_recompute_and_decodes_through_the_vocabulary(spec, vocab):
    model = _model(spec, vocab)
    cached = generate(model, _prompt(vocab), 16, vocabulary=vocab)
    full = generate(model, _prompt(vocab), 16, use_cache=False, vocabulary=vocab)
    assert cached.tokens == full.tokens and all(len(row) == 16 for row in cached.tokens)
    assert len({t for row in cached.tokens for t in row}) > 3 and any(t >= 256 for row in cached.tokens for t in row)
    assert all(0 <= t < vocab.size for row in cached.tokens for t in row)
    assert cached.texts == [vocab.decode(row) for row in cached.tokens]


def test_static_decoding_of_subword_ids_equals_the_growing_cache(vocab):
    """The static path, which the CUDA graph replays, run eagerly on the CPU."""
    model = _model("specs/quickstart.yaml", vocab)
    static = sampling._generate(model, _prompt(vocab), 16, 0.0, None, None, 0, [], "static", False, None, vocab)
    assert static.tokens == generate(model, _prompt(vocab), 16, vocabulary=vocab).tokens and static.texts == [vocab.decode(r) for r in static.tokens]


def test_neither_pad_nor_unused_ids_are_emitted(vocab):
    """A model favouring PAD and the unused ids above it: plain and speculative decoding pass over them."""
    model = _model("specs/hybrid_tiny.yaml", vocab, favour={i: 50.0 for i in range(vocab.pad, vocab.pad + 1 + UNUSED)})
    plain = generate(model, _prompt(vocab, 1), 12, vocabulary=vocab)
    assert all(0 <= t < vocab.size for t in plain.tokens[0]) and plain.stop_reasons == ["max_new_tokens"]
    sampled = generate(model, _prompt(vocab), 12, temperature=1.0, seed=0, vocabulary=vocab)
    assert all(0 <= t < vocab.size for row in sampled.tokens for t in row)
    assert generate(model, _prompt(vocab, 1), 12, speculative=True, vocabulary=vocab).tokens == plain.tokens


def test_speculative_decoding_equals_greedy_on_subword_ids(vocab):
    model = _model("specs/hybrid_tiny.yaml", vocab)
    plain = generate(model, _prompt(vocab, 1), 30, vocabulary=vocab)
    spec = generate(model, _prompt(vocab, 1), 30, speculative=True, vocabulary=vocab)
    assert spec.tokens == plain.tokens and spec.drafted > 0 and spec.texts == plain.texts


class EosAfter(LogitsProcessor):
    """Row 0 may only emit `eos` once it has generated 3 tokens."""

    name = "eos_after"

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, tokens, prompt_length, logits):
        if tokens.shape[1] - prompt_length < 3:
            return logits
        out = logits.clone()
        out[0] = float("-inf")
        out[0, self.eos] = 0.0
        return out


def test_the_vocabularys_eos_stops_a_row(vocab):
    assert vocab.eos != BYTE_VOCABULARY.eos
    model = _model("specs/quickstart.yaml", vocab)
    processors = [EosAfter(vocab.eos)]
    cached = generate(model, _prompt(vocab), 10, processors=processors, vocabulary=vocab)
    full = generate(model, _prompt(vocab), 10, processors=processors, use_cache=False, vocabulary=vocab)
    assert cached.tokens == full.tokens and cached.stop_reasons == ["eos", "max_new_tokens"]
    assert len(cached.tokens[0]) == 4 and cached.tokens[0][-1] == vocab.eos and len(cached.tokens[1]) == 10
    assert cached.texts[0] == vocab.decode(cached.tokens[0][:3])  # EOS is no text
    favoured = generate(_model("specs/quickstart.yaml", vocab, favour={vocab.eos: 50.0}), _prompt(vocab, 1), 10, vocabulary=vocab)
    assert favoured.tokens == [[vocab.eos]] and favoured.stop_reasons == ["eos"] and favoured.texts == [""]


def test_a_text_prompt_is_encoded_by_the_vocabulary(vocab):
    model = _model("specs/quickstart.yaml", vocab)
    out = generate(model, "the quick brown", 6, vocabulary=vocab)
    assert out.tokens == generate(model, [vocab.encode("the quick brown")], 6, vocabulary=vocab).tokens
    assert out.tokens == generate(model, "the quick brown".encode(), 6, vocabulary=vocab).tokens


def test_sampling_and_the_repetition_penalty_on_subword_ids(vocab):
    prompt = _prompt(vocab, 1)
    x, y = [t for t in range(vocab.size - 1, 0, -1) if t not in prompt[0].tolist() and t != vocab.eos][:2]
    model = _model("specs/quickstart.yaml", vocab, favour={x: 50.0, y: 40.0})
    assert generate(model, prompt, 4, vocabulary=vocab).tokens == [[x, x, x, x]]
    # x's logit halves to about 25 once seen, so y (40) comes next, then y's halves to 20 and x leads again
    assert generate(model, prompt, 4, processors=[RepetitionPenalty(2.0)], vocabulary=vocab).tokens == [[x, y, x, x]]
    model = _model("specs/quickstart.yaml", vocab)

    def sampled(seed: int) -> list[list[int]]:
        return generate(model, _prompt(vocab), 12, temperature=1.0, top_k=20, top_p=0.9, seed=seed, vocabulary=vocab).tokens

    assert sampled(7) == sampled(7) != sampled(8)
    assert generate(model, _prompt(vocab), 8, temperature=1.0, top_k=1, vocabulary=vocab).tokens == generate(model, _prompt(vocab), 8, vocabulary=vocab).tokens
    allowed = generate(model, _prompt(vocab), 8, temperature=1.0, processors=[AllowedTokens([x, y, vocab.eos])], vocabulary=vocab)
    assert {t for row in allowed.tokens for t in row} <= {x, y, vocab.eos}


def test_trace_shows_subword_tokens_as_their_text_pieces(vocab):
    model = _model("specs/quickstart.yaml", vocab)
    prompt = _prompt(vocab, 1)
    out = generate(model, prompt, 5, trace=True, vocabulary=vocab)
    assert [r["token"] for r in out.trace] == out.tokens[0]
    for r in out.trace:
        assert r["piece"] == vocab.decode([r["token"]]) and "byte" not in r
        for p in r["attention"]["top_prompt_positions"]:
            assert p["piece"] == vocab.decode([int(prompt[0, p["position"]])])
    assert any(len(r["piece"]) > 1 for r in out.trace)


def _one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_byte_constraints_and_structure_are_refused_for_a_subword_vocabulary(vocab):
    model, prompt = _model("specs/quickstart.yaml", vocab), _prompt(vocab, 1)
    message = _one_line_error(lambda: generate(model, prompt, 4, processors=[RegexConstraint("[a-z]+")], vocabulary=vocab), "^regex: constrains bytes")
    assert "multi-byte pieces" in message and vocab.tokenizer in message
    facts = FactVocabulary(["the quick brown fox"])
    _one_line_error(lambda: generate(model, prompt, 4, processors=[RepetitionPenalty(1.2), facts], vocabulary=vocab), "^fact_vocabulary: constrains bytes")
    structured = _model("specs/gpt5_moe_tiny.yaml", vocab)  # its GQA layers have a structural attention bias
    _one_line_error(lambda: generate(structured, prompt, 4, vocabulary=vocab), "^structure_buckets: .* scans bytes")
    small = build_model(spec_from_dict(yaml.safe_load(open("specs/quickstart.yaml"))["model"]["arch"]))
    _one_line_error(lambda: generate(small, [1, 2], 4, vocabulary=vocab), rf"^vocabulary: .* needs ids up to {vocab.pad} .* the model has 264$")


@pytest.fixture
def loaded(monkeypatch, vocab):
    """`generate`'s load_module replaced by one returning a subword model; the arguments it was called with."""
    calls = []
    module = types.SimpleNamespace(model=_model("specs/quickstart.yaml", vocab), arch=types.SimpleNamespace(vocab_ranges=None), vocabulary=vocab)

    def load_module(path, which="last", argument="--ckpt", tokenizer=None):
        calls.append((path, which, tokenizer))
        return module

    monkeypatch.setattr(generate_command, "load_module", load_module)
    return module, calls


def test_generate_command_encodes_and_decodes_through_the_models_vocabulary(loaded, vocab, tmp_path, capsys):
    module, calls = loaded
    trace = tmp_path / "trace.jsonl"
    main(["generate", "--ckpt", "run", "--prompt", "the quick brown", "--tokenizer", "moved/bpe.json", "--max-new-tokens", "6", "--trace", str(trace)])
    assert calls == [("run", "last", "moved/bpe.json")]
    expected = generate(module.model, vocab.encode("the quick brown"), 6, vocabulary=vocab)
    captured = capsys.readouterr()
    assert captured.out == vocab.decode(expected.tokens[0]) + "\n"
    assert captured.err.startswith("soma-lightning: 6 tokens, stop: max_new_tokens")
    assert [json.loads(line)["piece"] for line in trace.read_text().splitlines()] == [vocab.decode([t]) for t in expected.tokens[0]]


@pytest.mark.parametrize("flag, value", [("--allowed-bytes", "ab"), ("--denied_bytes", "x"), ("--regex", "[a-z]+"), ("--facts", "facts.txt")])
def test_generate_command_refuses_byte_flags_for_a_subword_model(loaded, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facts.txt").write_text("the quick brown fox\n")
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--ckpt", "run", "--prompt", "the", flag, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"--{flag[2:].replace('-', '_')}: constrains bytes, but run emits the tokens of" in err

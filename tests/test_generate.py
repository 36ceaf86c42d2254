"""Generation: cached decoding equals full recompute for every architecture spec, static caches (the code the
CUDA graph replays, run eagerly) equal both, the constraints, traces, speculative decoding with MTP heads, and
the `generate` command."""

import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from soma_lightning import build_model, load_spec
from soma_lightning.cli import main
from soma_lightning.generation.constraints import AllowedTokens, DeniedTokens, FactVocabulary, LogitsProcessor, RegexConstraint, RepetitionPenalty
from soma_lightning.data_modules.contract import EOS, PAD
from soma_lightning.data_modules.structure import StructureScanner, batch_structure, byte_structure
from soma_lightning.errors import UserError
from soma_lightning.generation import cuda_graph, sampling
from soma_lightning.generation import dropless, generate, static_blocker
from soma_lightning.nn.decode import DecodeState, StaticKVCache
from soma_lightning.nn.ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from soma_lightning.spec import spec_from_dict
from conftest import train_tiny_spec

SPECS = ["specs/quickstart.yaml", "specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml", "specs/sosm_hybrid_tiny.yaml"]
TEXT = b"def f(x):\n    return [x + 1, {'a': (x)}]  # one\n\nclass A:\n    def g(self, y):\n        return (y, [self])\n"


def _sosm_all_options():
    raw = yaml.safe_load(open("specs/sosm_tiny.yaml"))["model"]["arch"]
    raw["token_embedding"]["graph"] |= {"ema": 0.5, "adaptive_k": [1, 4], "mutual": True, "projection_dim": 8, "temporal_gate": 20.0, "chunk_size": 8, "threshold": 0.0}
    raw["token_embedding"] |= {"edge_gate": "learned", "block_groups": [["I", "D"], ["R1", "R2", "K"]]}
    raw["blocks"]["layer"][0]["mixer"] |= {"head_dim": 8, "differential": True, "rope_positions": "both", "landmark_every": 8, "landmark_buckets": 6}
    return spec_from_dict(raw)


def gqa_window_spec():
    """A GQA-only model with a sliding window and strided global keys (gpt5_moe_tiny's attention without the
    structural bias, a GELU feed-forward): static decoding applies."""
    mixer = {"type": "gqa", "num_heads": 4, "num_kv_heads": 2, "qk_norm": True, "window": 16, "global_stride": 8}
    layer = [{"norm": "rmsnorm", "mixer": mixer}, {"norm": "rmsnorm", "ffn": {"type": "gelu_mlp", "hidden_dim": 128}}]
    return spec_from_dict({"vocab_size": 264, "d_model": 64, "n_layers": 2, "blocks": {"layer": layer}, "final_norm": "rmsnorm", "predictor_bias": False})


STATIC_SPECS = ["specs/quickstart.yaml", "gqa_window"]


def _model(spec):
    if spec == "gqa_window":
        spec = gqa_window_spec()
    torch.manual_seed(0)
    return build_model(load_spec(spec) if isinstance(spec, str) else spec).eval()


def _prompt(batch=2, length=40):
    rows = [list(TEXT[i : i + length]) for i in range(batch)]
    return torch.tensor(rows)


@pytest.mark.parametrize("spec", SPECS + ["sosm_all_options"])
def test_cached_greedy_generation_equals_full_recompute(spec):
    model = _model(_sosm_all_options() if spec == "sosm_all_options" else spec)
    prompt = _prompt()
    cached = generate(model, prompt, max_new_tokens=24)
    full = generate(model, prompt, max_new_tokens=24, use_cache=False)
    assert cached.tokens == full.tokens
    assert all(len(row) == 24 for row in cached.tokens)
    assert len({t for row in cached.tokens for t in row}) > 3  # not a degenerate repetition


@pytest.mark.parametrize("spec", SPECS + ["sosm_all_options"])
@torch.no_grad()
def test_cached_logits_equal_full_recompute_with_a_prompt_in_two_pieces(spec):
    """Prompt fed as two multi-token passes (the second starting mid-sequence), then token by token; every
    pass's logits against the plain forward pass over the whole sequence."""
    model = _model(_sosm_all_options() if spec == "sosm_all_options" else spec)
    tokens = torch.tensor([list(TEXT[:60]), list(TEXT[3:63])])
    structure = batch_structure(tokens)
    state = DecodeState()
    with dropless(model):
        full = model(tokens, structure=structure)
        for a, b in [(0, 25), (25, 44)] + [(t, t + 1) for t in range(44, 60)]:
            reps, _ = model.extend(tokens[:, a:b], state, structure[:, a:b])
            torch.testing.assert_close(model.predict(reps), full[:, a:b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["specs/quickstart.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml"])
@torch.no_grad()
def test_rollback_into_a_pass_continues_exactly(spec):
    model = _model(spec)
    tokens = torch.tensor([list(TEXT[:40])])
    full = model(tokens)
    for keep in range(4):
        state = DecodeState(keep_steps=True)
        model.extend(tokens[:, :30], state)
        model.extend(torch.randint(0, 256, (1, 4)), state)  # rejected drafts
        state.rollback(30)
        reps, _ = model.extend(tokens[:, 30:34], state)  # the true next tokens, of which `keep` are then accepted
        state.rollback(30 + keep)
        reps, _ = model.extend(tokens[:, 30 + keep : 40], state)
        torch.testing.assert_close(model.predict(reps), full[:, 30 + keep : 40], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", STATIC_SPECS)
@torch.no_grad()
def test_static_cache_logits_equal_the_growing_cache_and_full_recompute(spec):
    """The static state after an unrelated longer sequence (stale keys past every position), then a prompt
    in two passes and single tokens: each pass's logits against the growing cache and the plain forward."""
    model = _model(spec)
    tokens = torch.tensor([list(TEXT[:60]), list(TEXT[3:63])])
    full = model(tokens)
    static, growing = DecodeState(80, position=torch.zeros((), dtype=torch.long)), DecodeState()
    model.extend(torch.randint(0, 256, (2, 75)), static)
    for a, b in [(0, 25), (25, 44)] + [(t, t + 1) for t in range(44, 60)]:
        static.position.fill_(a)
        got = model.predict(model.extend(tokens[:, a:b], static)[0])
        torch.testing.assert_close(got, model.predict(model.extend(tokens[:, a:b], growing)[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, full[:, a:b], rtol=1e-5, atol=1e-5)
    assert all(isinstance(c, StaticKVCache) and c.k.shape[2] == 80 for c in static.caches.values()) and static.tokens is None


class EndRows(LogitsProcessor):
    """Row r may only emit EOS once it has generated eos_after[r] tokens (None: no limit); row `dead_row`
    may emit nothing from its `dead_after`-th token on."""

    name = "end_rows"

    def __init__(self, eos_after: list[int | None], dead_row: int, dead_after: int) -> None:
        self.eos_after, self.dead_row, self.dead_after = eos_after, dead_row, dead_after

    def __call__(self, tokens, prompt_length, logits):
        generated = tokens.shape[1] - prompt_length
        out = logits.clone()
        for row, n in enumerate(self.eos_after):
            if n is not None and generated >= n:
                out[row, :EOS], out[row, EOS + 1 :] = float("-inf"), float("-inf")
        if generated >= self.dead_after:
            out[self.dead_row] = float("-inf")
        return out


@pytest.mark.parametrize("spec", STATIC_SPECS)
@torch.no_grad()
def test_static_cache_generation_equals_the_growing_cache_and_full_recompute(spec):
    """Batch 4: one row ends at EOS after 5 tokens, one after 11, one is left no allowed token after 8, one
    runs to max_new_tokens. The static decoder is kept from an earlier, longer generation (stale caches)."""
    model = _model(spec)
    prompt, processors = _prompt(4, 30), [EndRows([5, 11, None, None], dead_row=2, dead_after=8)]
    earlier = sampling._generate(model, _prompt(4, 40), 30, 0.0, None, None, 0, [], "static", False)
    kept = cuda_graph._static_decoders[model]
    static = sampling._generate(model, prompt, 30, 0.0, None, None, 0, processors, "static", False)
    assert cuda_graph._static_decoders[model] is kept  # fits: one capture per batch size and capacity on a GPU
    growing = generate(model, prompt, 30, processors=processors)
    full = generate(model, prompt, 30, processors=processors, use_cache=False)
    assert static.tokens == growing.tokens == full.tokens and static.stop_reasons == growing.stop_reasons == full.stop_reasons
    assert static.stop_reasons == ["eos", "eos", "no_allowed_token (after end_rows)", "max_new_tokens"]
    assert [len(row) for row in static.tokens] == [6, 12, 8, 30] and len({t for row in static.tokens for t in row}) > 5
    assert earlier.tokens == generate(model, _prompt(4, 40), 30).tokens


@torch.no_grad()
def test_static_decoder_is_rebuilt_when_the_parameters_change():
    """A kept static decoder (and on a GPU its graph) reads the parameter tensors it was built with: after
    `.double()` a new one, with float64 caches, decodes as the growing cache does."""
    model = _model("specs/quickstart.yaml")
    sampling._generate(model, _prompt(2, 20), 8, 0.0, None, None, 0, [], "static", False)
    kept = cuda_graph._static_decoders[model]
    model.double()
    static = sampling._generate(model, _prompt(2, 20), 8, 0.0, None, None, 0, [], "static", False)
    assert cuda_graph._static_decoders[model] is not kept
    assert static.tokens == generate(model, _prompt(2, 20), 8).tokens


def test_static_decoding_support_and_cuda_graph_errors():
    assert static_blocker(_model("specs/quickstart.yaml")) is None and static_blocker(_model("gqa_window")) is None
    assert static_blocker(_model("specs/gpt5_moe_tiny.yaml")) == "input_embeddings.0 (HashedNgramEmbedding)"
    assert static_blocker(_model("specs/hybrid_tiny.yaml")) == "encoder.layers.0.gdn (GatedDeltaNet)"
    assert static_blocker(_model("specs/sosm_tiny.yaml")) == "embedding (SemanticStateEmbedding)"
    raw = yaml.safe_load(open("specs/gpt5_moe_tiny.yaml"))["model"]["arch"]
    del raw["input_embeddings"]
    assert static_blocker(_model(spec_from_dict(raw))) == "encoder.layers.0.attention (GroupedQueryAttention)"  # structural bias
    del raw["blocks"]["layer"][0]["mixer"]["structure_buckets"]
    assert static_blocker(_model(spec_from_dict(raw))) == "encoder.layers.0.moe (MoE)"
    with pytest.raises(UserError, match="cuda_graph: needs the model on a CUDA device, it is on cpu"):
        generate(_model("specs/quickstart.yaml"), b"x", 2, cuda_graph=True)


def test_gated_delta_rule_continues_from_a_state():
    torch.manual_seed(0)
    b, t, h, hv, k, v = 2, 50, 2, 4, 8, 6
    q, kk = torch.randn(b, t, h, k), torch.randn(b, t, h, k)
    vv, g, beta = torch.randn(b, t, hv, v), -torch.rand(b, t, hv), torch.rand(b, t, hv)
    whole = gated_delta_rule_recurrent(q, kk, vv, g, beta)
    first, states = gated_delta_rule_recurrent(q[:, :30], kk[:, :30], vv[:, :30], g[:, :30], beta[:, :30], output_states=True)
    second, final = gated_delta_rule_chunked(
        q[:, 30:], kk[:, 30:], vv[:, 30:], g[:, 30:], beta[:, 30:], chunk_size=8, initial_state=states[:, -1], output_final_state=True
    )
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-5)
    _, all_states = gated_delta_rule_recurrent(q, kk, vv, g, beta, output_states=True)
    torch.testing.assert_close(final, all_states[:, -1], rtol=1e-5, atol=1e-5)


def test_structure_of_a_prefix_does_not_depend_on_later_bytes():
    random.seed(0)
    alphabet = list(b"ab (){}[]\n\n  \t_x1") + [EOS]
    for _ in range(50):
        data = [random.choice(alphabet) for _ in range(80)]
        full = byte_structure(data)
        scanner = StructureScanner()
        for t, b in enumerate(data):
            assert scanner.push(b) == full[t].tolist()
            if t % 9 == 0:
                np.testing.assert_array_equal(byte_structure(data[: t + 1]), full[: t + 1])


def test_moe_decodes_dropless_and_restores_the_capacity_factor():
    model = _model("specs/gpt5_moe_tiny.yaml")
    moe = model.encoder.layers[0].moe
    with dropless(model):
        assert moe.capacity_factor is None
    assert moe.capacity_factor == 1.25


# ---------------------------------------------------------------- constraints


def _logits(v=264):
    return torch.randn(2, v)


def test_allowed_and_denied_token_sets():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    out = AllowedTokens([1, 5, EOS])(tokens, 3, _logits())
    assert (out.isfinite().nonzero()[:, 1].unique().tolist()) == [1, 5, EOS]
    out = DeniedTokens([1, 5])(tokens, 3, _logits())
    assert not out[:, [1, 5]].isfinite().any() and out[:, [0, 2, 6]].isfinite().all()
    with pytest.raises(UserError, match="outside the vocabulary"):
        AllowedTokens([300])(tokens, 3, _logits())


def test_repetition_penalty_matches_the_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    out = RepetitionPenalty(2.0)(torch.tensor([[0, 1, 1]]), 1, logits)
    assert out.tolist() == [[1.0, -4.0, 1.0, 3.0]]


def test_fact_vocabulary_allows_only_words_from_facts_and_function_words():
    facts = FactVocabulary(["Paris is the capital of France."], function_words=["the", "a"])
    allowed = lambda text: {chr(b) for b, ok in enumerate(facts.allowed(list(text))) if ok and b < 256}  # noqa: E731
    assert set("ptcoiaPTCOIAfF") <= allowed(b"")  # word starts (and their capitals)
    assert allowed(b"the cap") & set("abcdefghijklmnopqrstuvwxyz") == {"i"}
    assert " " not in allowed(b"the cap") and not facts.allowed(list(b"the cap"))[256]  # no separator or EOS mid-word
    assert " " in allowed(b"the capital") and facts.allowed(list(b"Paris"))[256]
    model = _model("specs/quickstart.yaml")
    out = generate(model, b"Tell me: ", 40, processors=[facts], temperature=1.0, seed=3)
    words = re.findall(rb"[A-Za-z0-9']+", bytes(t for t in out.tokens[0] if t < 256))
    assert words and all(w.lower().decode() in facts.words for w in words[:-1])
    assert any(w.lower().decode().startswith(tuple(facts.prefixes)) for w in words[-1:])


@pytest.mark.parametrize("pattern", [r"(ab|c)+d?", r"\d{2,3}-[a-c]x*", r"(?:yes|no)\.", r"[^\n]{3}"])
def test_regex_prefix_viability_agrees_with_python_re(pattern):
    constraint, compiled = RegexConstraint(pattern), re.compile(pattern.encode())
    random.seed(1)
    alphabet = b"abcdx0123-.yesno\n"
    for _ in range(400):
        text = bytes(random.choice(alphabet) for _ in range(random.randint(0, 6)))
        assert constraint.matches(text) == (compiled.fullmatch(text) is not None)
        # viable: some byte continuation can still match; check by brute force one byte ahead against the NFA's answer
        allowed = constraint.allowed(constraint.states_after(list(text)))
        for b in alphabet:
            extended = text + bytes([b])
            viable = any(compiled.fullmatch(extended + bytes(rest)) for rest in _short_strings(alphabet))
            if viable:
                assert allowed[b], (text, chr(b))


def _short_strings(alphabet: bytes):
    yield b""
    for a in alphabet:
        yield bytes([a])
        for c in alphabet:
            yield bytes([a, c])


def test_regex_constrained_generation_matches_and_ends_with_eos():
    model = _model("specs/quickstart.yaml")
    pattern = r"(yes|no), [0-9]{2}\."
    out = generate(model, _prompt(2, 10), 30, temperature=1.0, seed=0, processors=[RegexConstraint(pattern)])
    for row, reason in zip(out.tokens, out.stop_reasons):
        assert reason == "eos" and row[-1] == EOS
        assert re.fullmatch(pattern.encode(), bytes(row[:-1]))


@pytest.mark.parametrize("pattern", [r"(a", r"a)", r"\1", r"(?=a)", r"a**", r"\b", r"a^b", r"[a", r"*"])
def test_unsupported_or_bad_regex_is_a_user_error(pattern):
    with pytest.raises(UserError, match="regex"):
        RegexConstraint(pattern)


def test_no_allowed_token_stops_the_row_with_a_reason():
    model = _model("specs/quickstart.yaml")
    out = generate(model, _prompt(2, 8), 10, processors=[AllowedTokens([ord("a")]), DeniedTokens([ord("a")])])
    assert out.tokens == [[], []] and out.stop_reasons == ["no_allowed_token (after denied_tokens)"] * 2
    out = generate(model, _prompt(1, 8), 10, processors=[RegexConstraint("ab")])
    assert out.tokens[0] == [ord("a"), ord("b"), EOS] and out.stop_reasons == ["eos"]


def test_sampling_is_seeded_and_respects_top_k():
    model = _model("specs/quickstart.yaml")
    a = generate(model, _prompt(), 12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    b = generate(model, _prompt(), 12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    c = generate(model, _prompt(), 12, temperature=1.0, top_k=5, top_p=0.9, seed=8)
    assert a.tokens == b.tokens != c.tokens
    out = generate(model, _prompt(1), 6, temperature=1.0, top_k=1, seed=0)
    assert out.tokens == generate(model, _prompt(1), 6).tokens  # top-1 sampling is greedy


# ---------------------------------------------------------------- provenance


@pytest.mark.parametrize("spec", SPECS)
def test_trace_records_probability_constraints_and_provenance(spec):
    model = _model(spec)
    out = generate(model, _prompt(1, 30), 5, processors=[DeniedTokens([ord("e")]), RepetitionPenalty(1.3)], trace=True)
    assert len(out.trace) == 5
    for r in out.trace:
        assert 0 < r["probability"] <= 1 and r["sampling_probability"] == 1.0
        assert [c["name"] for c in r["constraints"]] == ["denied_tokens", "repetition_penalty"]
        assert r["constraints"][0]["allowed"] == 256  # 256 bytes + EOS, less "e"
        top = r["attention"]["top_prompt_positions"]
        assert len(top) == 5 and all(0 <= p["position"] < 30 for p in top)
        weights = [p["weight"] for p in top]
        assert weights == sorted(weights, reverse=True) and sum(weights) <= 1 + 1e-6
    if "sosm" in spec:
        edges = out.trace[0]["graph_edges"]
        assert {"self", "previous"} <= {e["type"] for e in edges}
        assert edges[0]["position"] == out.trace[0]["position"] - 1 == 29 and sum(e["weight"] for e in edges) == pytest.approx(1, abs=1e-4)
    assert out.tokens == generate(model, _prompt(1, 30), 5, processors=[DeniedTokens([ord("e")]), RepetitionPenalty(1.3)]).tokens


# ---------------------------------------------------------------- speculative decoding with MTP heads


@torch.no_grad()
def test_speculative_decoding_equals_greedy():
    model = _model("specs/hybrid_tiny.yaml")
    prompt = _prompt(1, 30)
    plain = generate(model, prompt, 40)
    spec = generate(model, prompt, 40, speculative=True)
    assert spec.tokens == plain.tokens and spec.drafted > 0
    with pytest.raises(UserError, match="speculative"):
        generate(model, _prompt(2, 30), 4, speculative=True)
    with pytest.raises(UserError, match="no in-block MTP heads"):
        generate(_model("specs/quickstart.yaml"), prompt, 4, speculative=True)


def test_speculative_decoding_emits_only_what_plain_decoding_may():
    """A model whose main and MTP predictions all favour PAD: both decoders pass over it (it is never
    emittable), so they still agree."""
    model = _model("specs/hybrid_tiny.yaml")
    model.predictor.register_forward_hook(lambda module, args, out: out + 50.0 * F.one_hot(torch.tensor(PAD), out.shape[-1]))
    prompt = _prompt(1, 30)
    plain = generate(model, prompt, 20)
    assert PAD not in plain.tokens[0]
    assert generate(model, prompt, 20, speculative=True).tokens == plain.tokens


@pytest.mark.slow
def test_generate_command_with_constraints_and_trace(tmp_path, capsys):
    train_tiny_spec("specs/hybrid_tiny.yaml", tmp_path, steps=30)
    run = tmp_path / "runs" / "hybrid_tiny" / "version_0"
    trace = tmp_path / "trace.jsonl"
    main(["generate", "--ckpt", str(run), "--prompt", "ROMEO:\n", "--max-new-tokens", "12", "--regex", "[a-z ]+", "--trace", str(trace)])
    captured = capsys.readouterr()
    assert re.fullmatch(r"[a-z ]{1,12}\n", captured.out) and "stop:" in captured.err
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == len(captured.out.strip("\n")) + (records[-1]["token"] == EOS)
    assert records[0]["constraints"][0]["name"] == "regex" and "attention" in records[0]
    main(["generate", "--ckpt", str(run), "--prompt", "ROMEO:\n", "--max-new-tokens", "20", "--speculative"])
    spec_out = capsys.readouterr()
    main(["generate", "--ckpt", str(run), "--prompt", "ROMEO:\n", "--max-new-tokens", "20", "--no-cache"])
    assert capsys.readouterr().out == spec_out.out and "drafts accepted" in spec_out.err
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--ckpt", str(run), "--prompt", "x", "--regex", "(a"])
    assert exit.value.code == 2 and "regex '(a': missing )" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--ckpt", str(run), "--prompt", "x", "--cuda-graph"])
    assert exit.value.code == 2 and "cuda_graph: needs the model on a CUDA device" in capsys.readouterr().err

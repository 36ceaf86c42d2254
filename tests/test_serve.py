"""`soma-lightning serve`: the engine's batches of different prompt lengths equal `generate` for every
architecture; a server on 127.0.0.1 answers completion, streaming, constrained, traced and sampled requests
from a real HTTP client as `generate` does; concurrent clients; bad requests get a 400 and the server stays
up; a client that goes away mid-stream frees its slot; the command itself."""

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import uvicorn
import yaml

from soma_lightning.cli.generate import constraints
from soma_lightning.generation import generate
from soma_lightning.generation.constraints import FactVocabulary
from soma_lightning.lm import SomaLM
from soma_lightning.loading import load
from soma_lightning.quantize import quantize as quantize_weights
from soma_lightning.serving import Completion, Engine
from soma_lightning.serving.app import CompletionRequest, completion_of, create_app
from soma_lightning.spec import spec_from_dict
from conftest import fresh_checkpoint, one_error_line, tiny_v1_arch

SPECS = ["tiny_v1", "specs/gpt5_moe_tiny.yaml", "specs/hybrid_tiny.yaml", "specs/sosm_tiny.yaml", "specs/gpt5_moe_multimodal_tiny.yaml"]
PROMPTS = ["ROMEO:", "To be, or not to be", "def f(x):\n    return x + 1\n", "O", "First Citizen:\nBefore we proceed"]


def _module(spec: str) -> SomaLM:
    torch.manual_seed(0)
    arch = tiny_v1_arch(d_model=32, hidden_dim=64) if spec == "tiny_v1" else yaml.safe_load(open(spec))["model"]["arch"]
    return SomaLM(spec_from_dict(arch)).eval()


def _run(engine: Engine, completions: list[Completion], timeout: float = 120.0) -> list[list]:
    """Submit all completions before the worker starts (so they form one cohort); -> each one's events."""
    events: list[list] = [[] for _ in completions]
    done = threading.Semaphore(0)

    def emit(i):
        def put(event):
            events[i].append(event)
            if event.finish_reason is not None or event.error is not None:
                done.release()

        return put

    for i, completion in enumerate(completions):
        engine.submit(completion, emit(i))
    engine.start()
    try:
        for _ in completions:
            assert done.acquire(timeout=timeout)
    finally:
        engine.close()
    return events


def _reference(module: SomaLM, prompt: list[int], n: int, **kwargs):
    return generate(module.model, prompt, n, vocab_ranges=module.arch.vocab_ranges, vocabulary=module.vocabulary, **kwargs)


@pytest.mark.parametrize("spec", SPECS)
def test_a_batch_of_different_prompt_lengths_equals_generate_for_every_architecture(spec):
    module = _module(spec)
    prompts = [module.vocabulary.encode(p) for p in PROMPTS[:4]]
    engine = Engine(module)
    events = _run(engine, [Completion(p, 10) for p in prompts])
    assert engine.largest_batch == 4 and len({len(p) for p in prompts}) == 4
    for prompt, row in zip(prompts, events):
        reference = _reference(module, prompt, 10)
        assert [t for e in row for t in e.token_ids] == reference.tokens[0]
        assert "".join(e.text for e in row) == reference.texts[0]
        assert row[-1].finish_reason == ("stop" if reference.stop_reasons[0] == "eos" else "length")


def test_a_traced_batch_gives_generates_trace_records():
    """The fast path (a batch of four lengths, fed in lockstep) against the reference (one `generate` per
    prompt): the same tokens and trace records, probabilities within 1e-5."""
    module = _module("specs/gpt5_moe_tiny.yaml")
    prompts = [module.vocabulary.encode(p) for p in PROMPTS[:4]]
    made = lambda: constraints(None, "e", None, None, 1.3)  # noqa: E731 - fresh processors per use
    events = _run(Engine(module), [Completion(p, 8, processors=made(), trace=True) for p in prompts])
    for prompt, row in zip(prompts, events):
        reference = _reference(module, prompt, 8, processors=made(), trace=True).trace
        served = [r for e in row for r in e.trace]
        assert len(served) == len(reference) == 8
        for ours, theirs in zip(served, reference):
            for key in ("probability", "sampling_probability"):
                assert abs(ours.pop(key) - theirs.pop(key)) < 1e-5
            for a, b in zip(ours["attention"]["top_prompt_positions"], theirs["attention"]["top_prompt_positions"]):
                assert abs(a.pop("weight") - b.pop("weight")) < 1e-5
            for a, b in zip(ours["constraints"], theirs["constraints"]):
                for key in ("logit_before", "logit_after"):
                    assert (a[key] is None) == (b[key] is None) and abs((a.pop(key) or 0.0) - (b.pop(key) or 0.0)) < 1e-5
            assert ours == theirs


def test_a_subword_model_serves_and_refuses_byte_constraints(tmp_path):
    from test_prepare_text import bpe_tokenizer

    from soma_lightning.serving.app import BadRequest
    from soma_lightning.vocabulary import vocabulary

    path = str(bpe_tokenizer(tmp_path / "bpe.json"))
    arch = tiny_v1_arch(d_model=32, hidden_dim=64) | {"tokenizer": path, "vocab_size": vocabulary(path).pad + 1}
    torch.manual_seed(0)
    module = SomaLM(spec_from_dict(arch)).eval()
    engine = Engine(module)
    with pytest.raises(BadRequest, match="regex: constrains bytes"):
        completion_of(CompletionRequest(prompt="the quick", regex="[a-z]+"), engine)
    requests = [CompletionRequest(prompt=p, max_tokens=12, temperature=0.0) for p in ("the quick brown fox", "héllo", "code: def")]
    completions = [completion_of(r, engine) for r in requests]
    events = _run(engine, completions)
    for completion, row in zip(completions, events):
        reference = _reference(module, completion.prompt, 12)
        assert [t for e in row for t in e.token_ids] == reference.tokens[0] and "".join(e.text for e in row) == reference.texts[0]


def test_image_modality_prompts_as_generate_does():
    module = _module("specs/gpt5_moe_multimodal_tiny.yaml")
    engine = Engine(module)
    completion = completion_of(CompletionRequest(prompt="Sneaker", max_tokens=12, temperature=0.0, modality="image"), engine)
    events = _run(engine, [completion])
    from soma_lightning.data_modules.modalities import TokenSpace, prompt as modality_prompt

    head = modality_prompt(TokenSpace(module.arch.vocab_ranges), "Sneaker", "image").tolist()
    assert completion.prompt == head
    assert [t for e in events[0] for t in e.token_ids] == _reference(module, head, 12).tokens[0]


# --- the HTTP server ---------------------------------------------------------------------------------------


class Server:
    """`create_app` under uvicorn on 127.0.0.1 (a free port), in a thread; `reference` is a second copy of
    the model for `generate`."""

    def __init__(self, ckpt) -> None:
        self.engine = Engine(load(ckpt), max_batch=32)
        self.reference = load(ckpt)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine, "tiny"), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive()
            time.sleep(0.05)

    def request(self, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        out = response.status, response.read()
        connection.close()
        return out

    def complete(self, **body) -> dict:
        status, data = self.request("POST", "/v1/completions", body)
        assert status == 200, data
        return json.loads(data)

    def stream(self, **body) -> list[dict]:
        """The SSE chunks of a streamed completion; asserts the stream ends with [DONE]."""
        status, data = self.request("POST", "/v1/completions", body | {"stream": True})
        assert status == 200, data
        lines = [line for line in data.decode().split("\n\n") if line]
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        return [json.loads(line[len("data: ") :]) for line in lines[:-1]]

    def expected(self, prompt: str, n: int, **kwargs):
        module = self.reference
        return _reference(module, module.vocabulary.encode(prompt), n, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = fresh_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.ckpt", tiny_v1_arch(d_model=32, hidden_dim=64))
    s = Server(ckpt)
    yield s
    s.close()


def test_completion_equals_generate_in_openais_schema(server):
    out = server.complete(prompt="ROMEO:", max_tokens=20, temperature=0.0)
    expected = server.expected("ROMEO:", 20)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["token_ids"] == expected.tokens[0] and choice["text"] == expected.texts[0]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 20, "total_tokens": 26}


def test_streaming_sends_the_same_completion_in_chunks(server):
    chunks = server.stream(prompt="To be, or not", max_tokens=16, temperature=0.0)
    expected = server.expected("To be, or not", 16)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.texts[0]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected.tokens[0]
    assert chunks[-1]["usage"]["completion_tokens"] == 16


def test_constrained_requests_equal_generate_with_the_same_constraints(server):
    cases = [
        ({"allowed_bytes": "abcde ", "repetition_penalty": 1.5}, constraints("abcde ", None, None, None, 1.5)),
        ({"denied_bytes": "eta ", "regex": "[a-z]+( [a-z]+)*\\."}, constraints(None, "eta ", None, "[a-z]+( [a-z]+)*\\.", None)),
        ({"facts": ["the king is dead", "long live the queen"]}, [FactVocabulary(["the king is dead", "long live the queen"])]),
    ]
    for fields, processors in cases:
        out = server.complete(prompt="KING:", max_tokens=24, temperature=0.0, **fields)["choices"][0]
        expected = server.expected("KING:", 24, processors=processors)
        assert out["token_ids"] == expected.tokens[0] and out["text"] == expected.texts[0], fields
    regex_text = server.complete(prompt="KING:", max_tokens=24, temperature=0.0, regex="[a-z]{3,5}")["choices"][0]
    assert re.fullmatch("[a-z]{3,5}", regex_text["text"]) and regex_text["stop_reason"] == "eos"
    stuck = server.complete(prompt="KING:", max_tokens=24, temperature=0.0, facts=["abc"], regex="[0-9]+")
    assert stuck["choices"][0]["finish_reason"] == "stop" and stuck["choices"][0]["stop_reason"] == "no_allowed_token (after regex)"
    assert stuck["usage"]["completion_tokens"] == 0


def test_traced_request_returns_generates_trace(server):
    out = server.complete(prompt="ROMEO:", max_tokens=6, temperature=0.0, trace=True, denied_bytes="e")["choices"][0]
    expected = server.expected("ROMEO:", 6, processors=constraints(None, "e", None, None, None), trace=True)
    assert out["trace"] == expected.trace
    chunks = server.stream(prompt="ROMEO:", max_tokens=6, temperature=0.0, trace=True, denied_bytes="e")
    assert [r for c in chunks for r in c["choices"][0]["trace"]] == expected.trace


def test_sampling_with_a_seed_equals_generate(server):
    out = server.complete(prompt="ROMEO:", max_tokens=20, temperature=0.8, top_p=0.9, seed=7)["choices"][0]
    assert out["token_ids"] == server.expected("ROMEO:", 20, temperature=0.8, top_p=0.9, seed=7).tokens[0]


def test_stop_strings_cut_the_text_there(server):
    full = server.expected("ROMEO:", 30).texts[0]
    stop = full[10:12]
    cut = full[: full.find(stop)]
    out = server.complete(prompt="ROMEO:", max_tokens=30, temperature=0.0, stop=[stop, "\x00never"])["choices"][0]
    assert out["text"] == cut and out["finish_reason"] == "stop" and out["stop_reason"] == "stop string"
    chunks = server.stream(prompt="ROMEO:", max_tokens=30, temperature=0.0, stop=stop)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_eight_concurrent_clients_all_get_their_completions(server):
    prompts = [PROMPTS[i % len(PROMPTS)][: 3 + 2 * i] for i in range(8)]
    results: dict[int, dict] = {}
    barrier = threading.Barrier(8)

    def client(i):
        barrier.wait()
        body = {"prompt": prompts[i], "max_tokens": 40, "temperature": 0.0}
        results[i] = server.complete(**body) if i % 2 else {"choices": [_joined(server.stream(**body))]}

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, prompt in enumerate(prompts):
        expected = server.expected(prompt, 40)
        assert results[i]["choices"][0]["text"] == expected.texts[0], i
        assert results[i]["choices"][0]["token_ids"] == expected.tokens[0], i
    assert server.engine.stats()["largest_batch"] > 1  # they shared forward passes


def _joined(chunks: list[dict]) -> dict:
    return {"text": "".join(c["choices"][0]["text"] for c in chunks), "token_ids": [t for c in chunks for t in c["choices"][0]["token_ids"]]}


@pytest.mark.parametrize(
    "body, param, words",
    [
        (b'{"prompt": "x", ', None, "not valid JSON"),
        (b'["x"]', None, "dictionary"),
        ({"prompt": "x", "max_tokens": 4, "n": 2}, "n", "unknown field"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "must be positive"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens", "must be positive"),
        ({"prompt": "x", "max_tokens": 1024}, "max_tokens", "context of 1024 tokens"),
        ({"prompt": "x", "max_tokens": 4, "regex": "(?<=a)b"}, "regex", "supported"),
        ({"prompt": "", "max_tokens": 4}, "prompt", "at least 1 character"),
        ({"max_tokens": 4}, "prompt", "required"),
        ({"prompt": "x", "max_tokens": "4"}, "max_tokens", "integer"),
        ({"prompt": "x", "temperature": -1.0}, "temperature", "greater than or equal to 0"),
        ({"prompt": "x", "stop": [""]}, "stop", "non-empty"),
        ({"prompt": "x", "repetition_penalty": 0.0}, "repetition_penalty", "positive"),
        ({"prompt": "x", "modality": "image"}, "modality", "token space"),
    ],
)
def test_bad_requests_get_a_400_with_one_line_of_json_and_the_server_stays_up(server, body, param, words):
    status, data = server.request("POST", "/v1/completions", body)
    assert status == 400 and b"\n" not in data.strip(), data
    error = json.loads(data)["error"]
    assert words in error["message"] and error["param"] == param and error["type"] == "invalid_request_error", error
    assert server.complete(prompt="x", max_tokens=2, temperature=0.0)["choices"][0]["token_ids"] == server.expected("x", 2).tokens[0]


def _wait_until_idle(server) -> dict:
    deadline = time.time() + 30
    while server.engine.stats()["active"]:
        assert time.time() < deadline, server.engine.stats()
        time.sleep(0.05)
    status, data = server.request("GET", "/health")
    assert status == 200
    return json.loads(data)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_mid_request_frees_its_slot(server, stream):
    """1000 tokens asked for (the regex allows no EOS before), the client gone after the first chunk (or
    right away): the row is cancelled, not decoded to the end."""
    before = server.engine.stats()
    body = {"prompt": "ROMEO:", "max_tokens": 1000, "temperature": 0.0, "stream": stream, "regex": "[ -~]{1000}"}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(body))
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        assert server.engine.stats()["active"] == 1
        response.close()
    else:
        deadline = time.time() + 30
        while not server.engine.stats()["active"]:
            assert time.time() < deadline
            time.sleep(0.01)
    connection.sock.close()
    after = _wait_until_idle(server)
    assert after["active"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert server.complete(prompt="x", max_tokens=2, temperature=0.0)["usage"]["completion_tokens"] == 2


def test_models_endpoint(server):
    status, data = server.request("GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_serve_command_answers_on_localhost(tmp_path, capsys, quantize):
    """The command as a user starts it; with --quantize, the served model is generate's quantized one."""
    ckpt = fresh_checkpoint(tmp_path / "tiny.ckpt")
    assert "--device: expected cpu, cuda or cuda:N" in one_error_line(capsys, "serve", "--ckpt", str(ckpt), "--device", "tpu")
    assert "--max_batch, --max_cohorts: must be at least 1" in one_error_line(capsys, "serve", "--ckpt", str(ckpt), "--max-batch", "0")
    process = subprocess.Popen(
        [sys.executable, "-m", "soma_lightning", "serve", "--ckpt", str(ckpt), "--port", "0"] + (["--quantize", quantize] if quantize else []),
        stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        for line in process.stderr:
            if match := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                port = int(match[1])
                break
        assert port is not None, process.poll()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0.0}))
        out = json.loads(connection.getresponse().read())
        module = load(ckpt)
        if quantize:
            quantize_weights(module.model, quantize)
        assert out["choices"][0]["token_ids"] == _reference(module, module.vocabulary.encode("ROMEO:"), 5).tokens[0]
    finally:
        process.terminate()
        process.wait(timeout=30)

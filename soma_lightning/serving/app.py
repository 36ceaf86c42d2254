"""The HTTP face of the engine (FastAPI): OpenAI's `/v1/completions`, with server-sent events when
`stream` is true, plus `generate`'s constraints and traces; `/v1/models` and `/health`.

Bad input never reaches the model: the body is parsed and validated here, and every mistake is an HTTP 400
whose body is one line of JSON in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`.
"""

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from soma_lightning.cli.generate import constraints
from soma_lightning.data_modules.modalities import TokenSpace
from soma_lightning.data_modules.modalities import prompt as modality_prompt
from soma_lightning.errors import UserError
from soma_lightning.generation.constraints import FactVocabulary
from soma_lightning.serving.engine import Completion, Engine, Event

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields (`n`, `logprobs`, `echo`, `best_of`, ... are not
    supported and refused as unknown), then ours."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    model: str | None = None  # accepted and ignored: the server holds one model
    max_tokens: int = 16
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    # generate's constraints (byte vocabularies only), in the order they apply
    allowed_bytes: str | None = None
    denied_bytes: str | None = None
    facts: list[str] | None = None
    regex: str | None = None
    repetition_penalty: float | None = None
    trace: bool = False
    modality: Literal["text", "image", "audio"] = "text"


class BadRequest(Exception):
    """A request the server refuses: HTTP `status`, a one-line message, the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = " ".join(message.split()), param, status


def error_response(error: BadRequest) -> JSONResponse:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return JSONResponse({"error": {"message": error.message, "type": kind, "param": error.param, "code": None}}, status_code=error.status)


def parse(body: bytes) -> CompletionRequest:
    """The validated request, or BadRequest naming the first field at fault."""
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"body: not valid JSON ({e})") from None
    try:
        return CompletionRequest.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadRequest(f"{field or 'body'}: {message}", field) from None


def completion_of(request: CompletionRequest, engine: Engine) -> Completion:
    """What the engine decodes for `request`: its prompt ids (a label or transcript for another
    modality, as `generate --modality`), its processors and sampling; BadRequest when it cannot be served."""
    vocabulary, ranges = engine.vocabulary, engine.vocab_ranges
    byte_fields = {"allowed_bytes": request.allowed_bytes, "denied_bytes": request.denied_bytes, "facts": request.facts, "regex": request.regex}
    given = [name for name, value in byte_fields.items() if value is not None]
    if given and not vocabulary.is_bytes:
        raise BadRequest(f"{given[0]}: constrains bytes, but the model emits the tokens of {vocabulary.tokenizer} (multi-byte pieces)", given[0])
    if request.modality == "text":
        ids = vocabulary.encode(request.prompt)
    elif ranges is None:
        raise BadRequest(f"modality: {request.modality} needs a model with a token space (model.arch.vocab_ranges); this one has none", "modality")
    else:
        ids = modality_prompt(TokenSpace(ranges), request.prompt, request.modality).tolist()
    if not ids:
        raise BadRequest("prompt: encodes to no tokens", "prompt")
    if request.max_tokens <= 0:
        raise BadRequest(f"max_tokens: must be positive, got {request.max_tokens}", "max_tokens")
    if len(ids) + request.max_tokens > engine.context:
        raise BadRequest(
            f"max_tokens: the prompt's {len(ids)} tokens plus max_tokens {request.max_tokens} exceed the model's context of {engine.context} tokens", "max_tokens"
        )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if any(not s for s in stop):
        raise BadRequest("stop: stop strings must be non-empty", "stop")
    processors = []
    pieces = {  # each field's processors, in the order `generate` applies them
        "allowed_bytes": lambda: constraints(request.allowed_bytes, None, None, None, None),
        "denied_bytes": lambda: constraints(None, request.denied_bytes, None, None, None),
        "facts": lambda: [] if request.facts is None else [FactVocabulary([fact for fact in request.facts if fact.strip()])],
        "regex": lambda: constraints(None, None, None, request.regex, None),
        "repetition_penalty": lambda: constraints(None, None, None, None, request.repetition_penalty),
    }
    for field, build in pieces.items():
        try:
            processors += build()
        except UserError as e:
            raise BadRequest(str(e), field) from None
    return Completion(
        prompt=ids,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=None if request.top_p == 1.0 else request.top_p,
        seed=secrets.randbits(63) if request.seed is None else request.seed,
        processors=processors,
        stop=stop,
        trace=request.trace,
    )


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The application serving `engine` under `model_name`; it starts the engine's worker on startup and
    stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="soma-lightning", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name} | engine.stats()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "soma-lightning"}]}

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        try:
            request = parse(await http.body())
            completion = completion_of(request, engine)
        except BadRequest as e:
            return error_response(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                ticket.cancel()

        ticket = engine.submit(completion, emit)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model_name}
        prompt_tokens = len(completion.prompt)

        def choice(text: str, event: Event) -> dict:
            out = {"text": text, "index": 0, "logprobs": None, "finish_reason": event.finish_reason, "token_ids": event.token_ids}
            if event.stop_reason is not None:
                out["stop_reason"] = event.stop_reason
            if request.trace:
                out["trace"] = event.trace
            return out

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

        if request.stream:

            async def stream() -> AsyncIterator[str]:
                emitted = 0
                try:
                    while True:
                        event = await events.get()
                        if event.error is not None:
                            yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                            break
                        emitted += len(event.token_ids)
                        chunk = head | {"choices": [choice(event.text, event)]}
                        if event.finish_reason is not None:
                            yield f"data: {json.dumps(chunk | {'usage': usage(emitted)})}\n\n"
                            break
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    ticket.cancel()  # a no-op once finished; frees the slot of a client that went away

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        whole = Event()
        checked = loop.time()
        try:
            while whole.finish_reason is None:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                if loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await http.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the ticket is cancelled below
                if event is None:
                    continue
                if event.error is not None:
                    return error_response(BadRequest(f"decoding failed: {event.error}", status=500))
                whole.text += event.text
                whole.token_ids += event.token_ids
                whole.trace += event.trace
                whole.finish_reason, whole.stop_reason = event.finish_reason, event.stop_reason
        finally:
            ticket.cancel()
        return JSONResponse(head | {"choices": [choice(whole.text, whole)], "usage": usage(len(whole.token_ids))})

    return app

"""The serving engine: one worker thread that owns the model and decodes every request in flight.

Requests that arrive together form a *cohort*: one batch with one DecodeState. Rows of different prompt
lengths share it without padding: the cohort prefills the length every prompt has in one pass, then feeds
one token per row per step, the next prompt token for a row still inside its prompt and the sampled token
for a row past it. Every row's cache therefore holds only its own tokens at their own positions, so this
is exact for every architecture (attention, recurrent layers, SOSM's semantic state, structure scanning,
n-gram embeddings) with no mask, and batch rows never interact. A row longer than the shortest prompt
pays one step per extra prompt token instead of a parallel prefill.

The worker steps every cohort once per iteration and admits what arrived meanwhile as a new cohort at the
next one (continuous batching at cohort granularity), while fewer than `max_cohorts` run; otherwise the new
requests wait until a cohort ends and then start together. A step's cost hardly depends on the batch size
where decoding is bound by per-operation overhead (small models, CPU), so fewer, larger cohorts give more
throughput, at the price of that wait. `max_batch` bounds the rows in flight; a row that ends (EOS,
max_tokens, a stop string, or its client cancelling) frees its slot at once and is sent no more work
(its batch row runs on, fed EOS, until the cohort's last row ends and the cohort is dropped).

Each row samples and applies its own logits processors exactly as `generate` does for a one-row prompt
(the same `choose_tokens`, the same trace records), so a request alone in its cohort
gets `generate`'s logits bit for bit; in a cohort of several, the batched matrix products may differ from
the one-row ones in the last bits of float32, which leaves greedy tokens equal unless two candidates tie
to within rounding.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from soma_lightning.generation import dropless
from soma_lightning.generation.constraints import LogitsProcessor
from soma_lightning.generation.decoders import Decoder, emittable
from soma_lightning.generation.sampling import choose_tokens
from soma_lightning.generation.trace import Stage, attention_layer, token_record
from soma_lightning.lm import SomaLM


@dataclass
class Completion:
    """What one request asks for: prompt token ids, at most `max_tokens` new ones, sampling as `generate`
    (temperature 0: greedy), its logits processors (fresh instances: they keep per-request state), stop
    strings that end the text before them, and whether to record a trace."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    processors: list[LogitsProcessor] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    trace: bool = False


@dataclass
class Event:
    """A piece of a completion: the new text (stop strings cut, text that might begin a stop string or is an
    incomplete UTF-8 sequence held back until it is decided), the token ids emitted since the last event
    and their trace records. The last event has `finish_reason` ("stop" or "length", as OpenAI's) and
    `stop_reason`: generate's ("eos", "max_new_tokens", "no_allowed_token (after NAME)") or "stop string";
    or `error` when decoding failed."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    error: str | None = None


class Ticket:
    """A submitted completion; `emit` receives its events on the worker thread; `cancel` ends it at the
    worker's next step (a client that went away)."""

    def __init__(self, completion: Completion, emit: Callable[[Event], None]) -> None:
        self.completion, self.emit = completion, emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest of `stops` begins in `text`, if any does."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class _Row:
    """One request in a cohort: its generated ids, the text sent so far and its sampling generator."""

    def __init__(self, ticket: Ticket, device: torch.device) -> None:
        self.ticket = ticket
        self.completion = ticket.completion
        self.generated: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.done = False
        c = self.completion
        self.generator = torch.Generator(device).manual_seed(c.seed) if c.temperature > 0 else None
        self.hold = max((len(s) for s in c.stop), default=1) - 1  # a stop string may begin this far back

    def text_event(self, text: str, final: bool) -> str:
        """The text not sent yet: all of it when `final`, else what can no longer change or start a stop."""
        end = len(text)
        if not final:
            end -= self.hold
            while end > self.sent and text[end - 1] == "\ufffd":  # maybe an incomplete UTF-8 sequence
                end -= 1
        piece = text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece


class _Cohort:
    """Rows decoded in one batch, in lockstep (see the module docstring)."""

    def __init__(self, engine: "Engine", tickets: list[Ticket]) -> None:
        self.engine = engine
        self.rows = [_Row(t, engine.device) for t in tickets]
        prompts = [t.completion.prompt for t in tickets]
        start = min(map(len, prompts))
        capacity = max(len(t.completion.prompt) + t.completion.max_tokens for t in tickets)
        self.trace = tickets[0].completion.trace
        self.decoder = Decoder(engine.model, len(tickets), capacity, "cache", record_attention=self.trace)
        self.tokens = torch.tensor([p[:start] for p in prompts], dtype=torch.long, device=engine.device)
        self.new = self.tokens
        self.layer = None  # the attention layer traces report, known after the first pass

    @property
    def finished(self) -> bool:
        return all(row.done for row in self.rows)

    def step(self) -> None:
        """One forward pass; every row past its prompt samples a token."""
        engine = self.engine
        raw = self.decoder.logits(self.new)[0][:, -1].float()
        if self.trace and self.layer is None:
            self.layer = attention_layer(engine.model, self.decoder.state)
        logits = raw.masked_fill(~engine.allowed, float("-inf"))
        length = self.tokens.shape[1]
        feed = [engine.eos] * len(self.rows)  # the next token of each row
        plain: list[int] = []  # greedy rows without processors (nor a trace): one argmax for them all
        own: list[int] = []  # rows that sample or constrain: each as `generate` does
        for i, row in enumerate(self.rows):
            if row.ticket.cancelled and not row.done:
                row.done = True
                engine.cancelled += 1
            prompt = row.completion.prompt
            if row.done:
                continue
            if length < len(prompt):
                feed[i] = prompt[length]
            elif row.completion.temperature == 0 and not row.completion.processors and not self.trace:
                plain.append(i)
            else:
                own.append(i)
        if not plain and not own:
            self._advance(feed)
            return
        chosen, dead, sampled, stages = [], [], {}, {}
        if plain:
            rows = logits[plain]
            dead.append(~rows.isfinite().any(dim=-1))
            chosen.append(rows.masked_fill(dead[-1][:, None], 0.0).argmax(dim=-1))
        for i in own:
            row = self.rows[i]
            c = row.completion
            token, sampled[i], row_dead, stages[i] = choose_tokens(
                logits[i : i + 1], self.tokens[i : i + 1], len(c.prompt), c.processors, c.temperature, None, c.top_p, row.generator
            )
            chosen.append(token)
            dead.append(row_dead)
        chosen_ids, dead_rows = torch.stack([torch.cat(chosen), torch.cat(dead).long()]).tolist()  # one transfer to the host
        model_probs = raw.softmax(dim=-1) if self.trace else None
        for i, token, no_token in zip(plain + own, chosen_ids, dead_rows):
            self._emit(i, token, bool(no_token), model_probs, sampled.get(i), stages.get(i, []))
            feed[i] = engine.eos if self.rows[i].done else token
        self._advance(feed)

    def _advance(self, feed: list[int]) -> None:
        """Append each row's next token, unless every row has ended."""
        if self.finished:
            return
        self.new = torch.tensor(feed, dtype=torch.long, device=self.engine.device)[:, None]
        self.tokens = torch.cat([self.tokens, self.new], dim=1)

    def _emit(self, i: int, token: int, dead: bool, model_probs: Tensor | None, sampled: Tensor | None, stages: list[Stage]) -> None:
        """Row i's token, or its end when no token was allowed: its event; the row ends at EOS, a stop string
        or max_tokens."""
        row, engine = self.rows[i], self.engine
        if dead:
            culprit = next((name for name, _, after in stages if not after.isfinite().any()), "non-finite logits")
            return self._finish(row, Event(), "stop", f"no_allowed_token (after {culprit})")
        event = Event(token_ids=[token])
        if self.trace:
            batch = len(self.rows)
            record = token_record(
                i, len(row.generated), token, self.tokens, len(row.completion.prompt), model_probs, sampled.expand(batch, -1),
                [(name, before.expand(batch, -1), after.expand(batch, -1)) for name, before, after in stages], self.decoder.state, self.layer, engine.vocabulary,
            )
            event.trace.append(record | {"row": 0})  # the row of a one-prompt `generate`
        row.generated.append(token)
        text = engine.vocabulary.decode(row.generated)
        cut = first_stop(text, row.completion.stop)
        if cut is not None:
            return self._finish(row, event, "stop", "stop string", text[:cut])
        if token == engine.eos:
            return self._finish(row, event, "stop", "eos", text)
        if len(row.generated) == row.completion.max_tokens:
            return self._finish(row, event, "length", "max_new_tokens", text)
        event.text = row.text_event(text, final=False)
        row.ticket.emit(event)

    def _finish(self, row: _Row, event: Event, finish_reason: str, stop_reason: str, text: str | None = None) -> None:
        row.done = True
        text = self.engine.vocabulary.decode(row.generated) if text is None else text
        event.text, event.finish_reason, event.stop_reason = row.text_event(text, final=True), finish_reason, stop_reason
        row.ticket.emit(event)

    def fail(self, error: BaseException) -> None:
        """End every row still going with an error event (the worker keeps serving the others)."""
        _fail([row.ticket for row in self.rows if not row.done], error)
        for row in self.rows:
            row.done = True


def _fail(tickets: list[Ticket], error: BaseException) -> None:
    message = " ".join(f"{type(error).__name__}: {error}".split())
    for ticket in tickets:
        ticket.emit(Event(error=message))


class Engine:
    """The model of `module` on `device`, served by one worker thread (`start`, `close`): `submit` a
    Completion, receive its Events. At most `max_batch` rows decode at once, in at most `max_cohorts`
    batches (see the module docstring). `context`: the longest sequence a request may reach (prompt plus
    max_tokens), the spec's max_seq_len."""

    def __init__(self, module: SomaLM, device: str | torch.device = "cpu", max_batch: int = 32, max_cohorts: int = 2) -> None:
        self.device = torch.device(device)
        self.model = module.model.to(self.device).eval()
        self.vocabulary = module.vocabulary
        self.vocab_ranges = module.arch.vocab_ranges
        self.context = module.arch.max_seq_len
        self.eos = self.vocabulary.eos
        self.allowed = emittable(self.model.predictor.out_features, self.vocab_ranges, self.vocabulary, self.device)
        self.max_batch, self.max_cohorts = max_batch, max_cohorts
        self.largest_batch = 0  # the most rows a cohort has held
        self.cancelled = 0  # rows ended because their client went away
        self._pending: deque[Ticket] = deque()
        self._cohorts: list[_Cohort] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="soma-lightning-serve", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, completion: Completion, emit: Callable[[Event], None]) -> Ticket:
        ticket = Ticket(completion, emit)
        with self._wake:
            self._pending.append(ticket)
            self._wake.notify()
        return ticket

    def stats(self) -> dict[str, int]:
        """Rows decoding now (`active`), waiting for a slot (`pending`), cohorts in flight, the largest cohort
        so far, rows ended because their client went away."""
        with self._wake:
            active = sum(not row.done for cohort in self._cohorts for row in cohort.rows)
            return {"active": active, "pending": len(self._pending), "cohorts": len(self._cohorts), "largest_batch": self.largest_batch, "cancelled": self.cancelled}

    def _admit(self) -> list[Ticket]:
        """Wait for work; -> the pending tickets that fit in the free slots (empty once closed)."""
        with self._wake:
            while not self._closed and not self._pending and not self._cohorts:
                self._wake.wait()
            if self._closed or len(self._cohorts) >= self.max_cohorts:
                return []
            active = sum(not row.done for cohort in self._cohorts for row in cohort.rows)
            taken = []
            while self._pending and active + len(taken) < self.max_batch:
                ticket = self._pending.popleft()
                if not ticket.cancelled:
                    taken.append(ticket)
            return taken

    def _run(self) -> None:
        with torch.no_grad():
            while not self._closed:
                taken = self._admit()
                for trace in (False, True):  # a trace records attention with the float32 reference: its own cohort
                    tickets = [t for t in taken if t.completion.trace == trace]
                    if tickets:
                        try:
                            cohort = _Cohort(self, tickets)
                        except Exception as e:  # noqa: BLE001 - reported to its clients; the server goes on
                            _fail(tickets, e)
                            continue
                        self.largest_batch = max(self.largest_batch, len(tickets))
                        with self._wake:
                            self._cohorts.append(cohort)
                with dropless(self.model):
                    for cohort in list(self._cohorts):
                        try:
                            cohort.step()
                        except Exception as e:  # noqa: BLE001 - reported to its clients; the server goes on
                            cohort.fail(e)
                with self._wake:
                    self._cohorts = [c for c in self._cohorts if not c.finished]

"""lm-evaluation-harness tasks on a SomaLM: `SomaEvalLM` answers the harness's requests with the model, and
`evaluate` runs tasks by name and returns their metrics.

Importing this module imports `lm_eval` (the `eval` extra); nothing is registered in the harness's model
registry: `evaluate` hands it the adapter itself.
"""

import difflib
import os
import threading
from collections.abc import Callable

import torch

from soma_lightning.errors import UserError
from soma_lightning.generation.decoders import dropless
from soma_lightning.lm import SomaLM

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise UserError("evaluate: lm_eval is not installed; pip install 'soma-lightning[eval]'") from None

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until tasks that set none


class SomaEvalLM(TemplateLM):
    """The harness's view of a SomaLM: ids from `module.vocabulary` (bytes, or its tokenizer's), EOS as the
    context of an empty prompt, sequences cut to the model's `max_seq_len` on the left."""

    def __init__(self, module: SomaLM, batch_size: int = 16) -> None:
        super().__init__()
        if batch_size <= 0:
            raise UserError(f"--batch_size: expected a positive number of requests per forward pass, got {batch_size}")
        self.module, self.batch_size = module, batch_size
        self.vocabulary = module.vocabulary
        self.max_length = module.arch.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.vocabulary.eos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.vocabulary.encode(string)

    @property
    def device(self) -> torch.device:
        return next(self.module.model.parameters()).device

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding gives it) per (key, context ids,
        continuation ids). The model reads the rightmost `max_seq_len` ids of context + continuation (less the
        last, which only is a target); requests are batched longest first and padded on the right, which a
        causal model's earlier positions never see."""
        for _, _, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(f"evaluate: a continuation of {len(continuation)} tokens exceeds the model's max_seq_len {self.max_length}")
        inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            tokens = torch.full((len(chunk), len(inputs[chunk[0]])), self.vocabulary.pad, dtype=torch.long)
            for row, i in enumerate(chunk):
                tokens[row, : len(inputs[i])] = torch.tensor(inputs[i])
            with dropless(self.module.model):
                log_probs = self.module.model(tokens.to(self.device)).float().log_softmax(dim=-1).cpu()
            for row, i in enumerate(chunk):
                target = torch.tensor(requests[i][2], dtype=torch.long)
                end = len(inputs[i])
                scores = log_probs[row, end - len(target) : end]
                results[i] = (scores.gather(-1, target[:, None]).sum().item(), bool((scores.argmax(dim=-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts (perplexity tasks): the sum over disjoint windows of `max_seq_len`
        tokens, the first conditioned on EOS and each later one on the tokens before it."""
        out = []
        for (text,) in [request.args for request in requests]:
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)
            scored = self._loglikelihood_tokens([(None, *make_disjoint_window(window)) for window in windows])
            out.append(sum(log_prob for log_prob, _ in scored))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded together by the serving engine (serving/engine.py: prompts of different lengths
        share batches of up to `batch_size` rows, exactly, without padding), greedy unless a task asks for
        `do_sample`; each ends at the first of its `until` strings, EOS or `max_gen_toks`. The prompt keeps its
        rightmost ids that leave room for `max_gen_toks`."""
        from soma_lightning.serving.engine import Completion, Engine, Event

        completions = []
        for context, gen_kwargs in [request.args for request in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = min(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - max_new_tokens):] or [self.prefix_token_id]
            temperature = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample") else 0.0
            completions.append(Completion(prompt, max_new_tokens, temperature=temperature, stop=[stop for stop in until if stop]))
        texts: list[list[str]] = [[] for _ in completions]
        errors: list[str] = []
        finished = threading.Semaphore(0)

        def collector(i: int) -> Callable[[Event], None]:
            def emit(event: Event) -> None:  # on the engine's worker thread
                texts[i].append(event.text)
                if event.error is not None:
                    errors.append(event.error)
                if event.finish_reason is not None or event.error is not None:
                    finished.release()

            return emit

        engine = Engine(self.module, device=self.device, max_batch=self.batch_size, max_cohorts=1)
        engine.start()
        try:
            for i, completion in enumerate(completions):
                engine.submit(completion, collector(i))
            for _ in completions:
                finished.acquire()
        finally:
            engine.close()
        if errors:
            raise RuntimeError(f"evaluate: decoding failed: {errors[0]}")
        return ["".join(pieces) for pieces in texts]


def task_manager(include_path: str | None) -> TaskManager:
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include_path: {include_path!r} is not a directory of task YAML files")
    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], manager: TaskManager) -> None:
    """One line naming an unknown task and the known names closest to it."""
    if not tasks:
        raise UserError("--tasks: expected at least one task name, comma-separated")
    known = manager.all_tasks
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5)
            hint = f"; close names: {', '.join(close)}" if close else "; --include_path adds a folder of task YAML files"
            raise UserError(f"--tasks: unknown task {name!r}{hint}")


def evaluate(
    module: SomaLM, tasks: list[str], include_path: str | None = None, limit: int | float | None = None, batch_size: int = 16,
    manager: TaskManager | None = None,
) -> dict:
    """The harness's results (its `results` mapping: task -> {"metric,filter": value}) of `tasks` on `module`,
    run in eval mode (the module's mode is restored after). `limit`: documents per task (a fraction if < 1)."""
    manager = manager or task_manager(include_path)
    check_tasks(tasks, manager)
    adapter = SomaEvalLM(module, batch_size)
    was_training = module.training
    module.eval()
    try:
        results = lm_eval.simple_evaluate(
            model=adapter, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=1000, log_samples=False
        )
    finally:
        module.train(was_training)
    return results["results"]


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of every numeric metric in the harness's results."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((task, metric if filter_name in ("", "none") else f"{metric}[{filter_name}]", float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows

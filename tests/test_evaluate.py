"""`soma-lightning evaluate` and the lm-evaluation-harness adapter, offline over tests/data/eval_task."""

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import fresh_checkpoint, run_config, tiny_v1_arch
from soma_lightning.cli import main
from soma_lightning.evaluation import SomaEvalLM, evaluate
from soma_lightning.generation import generate
from soma_lightning.lm import SomaLM
from soma_lightning.spec import spec_from_dict


TASK_DIR = Path(__file__).parent / "data" / "eval_task"
ROWS = [json.loads(line) for line in (TASK_DIR / "rows.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tasks(tmp_path) -> str:
    """The shipped task YAMLs, with the jsonl's absolute path (datasets resolves data_files from the cwd)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for yaml in TASK_DIR.glob("*.yaml"):
        (folder / yaml.name).write_text(yaml.read_text().replace("tests/data/eval_task/rows.jsonl", str(TASK_DIR / "rows.jsonl")))
    return str(folder)


def tiny_module(**arch) -> SomaLM:
    return SomaLM(spec_from_dict(tiny_v1_arch() | arch)).eval()


def continuation_log_prob(module: SomaLM, context: bytes, continuation: bytes) -> float:
    """A plain forward over context + continuation: the continuation's summed log-probs."""
    ids = torch.tensor([list(context + continuation)])
    with torch.no_grad():
        log_probs = module.model(ids).float().log_softmax(dim=-1)[0]
    positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
    return log_probs[positions, ids[0, len(context):]].sum().item()


def test_multiple_choice_matches_direct_scoring(tasks):
    module = tiny_module()
    results = evaluate(module, ["tiny_choice"], tasks)["tiny_choice"]
    acc = acc_norm = 0
    for row in ROWS:
        context = f"Q: {row['question']}\nA:".encode()
        scores = torch.tensor([continuation_log_prob(module, context, f" {choice}".encode()) for choice in row["choices"]])
        lengths = torch.tensor([float(len(choice)) for choice in row["choices"]])  # the harness's: without the delimiter
        acc += int(scores.argmax()) == row["answer"]
        acc_norm += int((scores / lengths).argmax()) == row["answer"]
    assert results["acc,none"] == acc / len(ROWS)
    assert results["acc_norm,none"] == acc_norm / len(ROWS)


def test_long_context_keeps_the_rightmost_window():
    module = tiny_module(max_seq_len=16)
    adapter = SomaEvalLM(module, batch_size=2)
    context, continuation = list(range(40, 80)), [65, 66, 67]
    # the model reads 16 ids, the last 14 of the context and the first 2 of the continuation, to score 3
    long, short = adapter._loglikelihood_tokens([(None, context, continuation), (None, context[-14:], continuation)])
    assert long[0] == pytest.approx(short[0], abs=1e-5) and long[1] == short[1]
    assert long[0] == pytest.approx(continuation_log_prob(module, bytes(context[-14:]), bytes(continuation)), abs=1e-5)
    with pytest.raises(Exception, match="max_seq_len 16"):
        adapter._loglikelihood_tokens([(None, [1], list(range(17)))])


def test_loglikelihood_rolling_scores_the_text_after_eos():
    module = tiny_module()
    text = "hello there"
    (rolling,) = SomaEvalLM(module).loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = torch.tensor([[module.vocabulary.eos, *text.encode()]])
    with torch.no_grad():
        log_probs = module.model(ids).float().log_softmax(dim=-1)[0, :-1]
    assert rolling == pytest.approx(log_probs.gather(-1, ids[0, 1:, None]).sum().item(), abs=1e-4)


def test_generate_until_decodes_requests_together_and_cuts_at_the_first_stop_string():
    """Prompts of different lengths decoded in shared batches (2 rows, so also one after another) give each
    the greedy continuation `generate` gives it alone, ended at the earliest of its `until` strings."""
    module = tiny_module()
    prompts = ["Q: The sky is\nA:", "To be", "Once upon a time, there", "x"]
    fulls = [generate(module.model, prompt, 12, temperature=0, vocabulary=module.vocabulary).texts[0] for prompt in prompts]
    stops = [full[4:6] for full in fulls]
    requests = [SimpleNamespace(args=(prompt, {"until": ["\x00never", stop], "max_gen_toks": 12})) for prompt, stop in zip(prompts, stops)]
    requests.append(SimpleNamespace(args=(prompts[1], {"until": [], "max_gen_toks": 12})))
    texts = SomaEvalLM(module, batch_size=2).generate_until(requests)
    assert texts[:4] == [full[: full.index(stop)] for full, stop in zip(fulls, stops)]
    assert texts[4] == fulls[1]
    assert SomaEvalLM(module).generate_until([]) == []


def test_cli_prints_the_table_and_writes_json(tasks, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny" / "version_0"
    fresh_checkpoint(run / "checkpoints" / "last.ckpt")
    main(["evaluate", "--ckpt", str(run), "--tasks", "tiny_choice,tiny_echo", "--include-path", tasks, "--limit", "3"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "metric", "value", "stderr"]
    assert "tiny_choice" in out and "acc_norm" in out and "exact_match" in out
    written = json.loads((run / "evaluate-last.json").read_text())
    assert set(written["results"]) == {"tiny_choice", "tiny_echo"}
    assert 0 <= written["results"]["tiny_choice"]["acc"]["value"] <= 1


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tasks", "tiny_choise"], "--tasks: unknown task 'tiny_choise'; close names: tiny_choice"),
        (["--tasks", "tiny_choice", "--include_path", "/nonexistent"], "--include_path: '/nonexistent' is not a directory"),
    ],
)
def test_cli_errors_are_one_line(tasks, tmp_path, capsys, flags, expected):
    ckpt = fresh_checkpoint(tmp_path / "m.ckpt")
    if "--include_path" not in flags:
        flags = [*flags, "--include_path", tasks]
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--ckpt", str(ckpt), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_bad_checkpoint_and_missing_lm_eval_are_one_line(tasks, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", str(tmp_path / "missing.ckpt"), "--tasks", "tiny_choice", "--include_path", tasks])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.ckpt" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.delitem(sys.modules, "soma_lightning.evaluation")
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", str(tmp_path / "m.ckpt"), "--tasks", "tiny_choice"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "soma-lightning[eval]" in err


def test_in_loop_evaluation_logs_the_tasks_at_every_validation(tasks, tmp_path):
    """callbacks.Evaluation in a fit: eval/<task>/<metric> in metrics.csv at each validation (steps 4 and 8)."""
    from soma_lightning.cli import cli_main

    callback = {"class_path": "soma_lightning.callbacks.Evaluation", "init_args": {"tasks": ["tiny_choice"], "include_path": tasks, "limit": 3}}
    cli_main(["fit", "--config", str(run_config(tmp_path, "in_loop", 8, callbacks=[callback]))])
    rows = list(csv.DictReader(open(tmp_path / "runs" / "in_loop" / "version_0" / "metrics.csv")))
    logged = [(int(r["step"]), float(r["eval/tiny_choice/acc"])) for r in rows if r.get("eval/tiny_choice/acc")]
    assert [step for step, _ in logged] == [3, 7] and all(0.0 <= acc <= 1.0 for _, acc in logged)

"""The scale-out and design-step harnesses (bench/) on CPU: the runs scale_out.py plans (names, the batch each rank
reads, the run each one's losses are compared with) and design_step.py's measured bytes against the plan."""

import json
import re
import subprocess
import sys

import pytest


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], capture_output=True, text=True, timeout=300)


def test_scale_out_plans_each_run_on_each_gpu_count_with_the_same_global_batch():
    done = _bench("scale_out.py", "--dry-run", "--config", "specs/gpt5_moe_tiny.yaml", "--runs", "one_gpu,fsdp2,ep2,tp2,cp4@4", "--gpus", "2,4", "--global-batch", "8")
    assert done.returncode == 0, done.stderr
    plan = {}
    for header, command in zip(*[iter(done.stdout.splitlines())] * 2):
        name, gpus, reference = re.fullmatch(r"# (\S+): (\d) GPUs, losses against (\S+)", header).groups()
        devices = re.search(r"--trainer.devices (\d)", command)
        mesh = re.search(r"--parallel.(\w+) (\d)", command)
        plan[name] = (int(gpus), devices and int(devices[1]), mesh and mesh.groups(), int(re.search(r"--data.init_args.batch_size (\d)", command)[1]), reference)
    # (GPUs, trainer.devices, --parallel flag, sequences per rank, reference): tp and cp ranks share a batch, and the
    # reference is the run whose ranks read the same batches
    assert plan == {
        "one_gpu": (1, 1, None, 8, "none"),
        "fsdp2@2": (2, 2, None, 4, "one_gpu"), "fsdp2@4": (4, 4, None, 2, "one_gpu"),
        "ep2@2": (2, 2, ("ep", "2"), 4, "fsdp2@2"), "ep2@4": (4, 4, ("ep", "2"), 2, "fsdp2@4"),
        "tp2@2": (2, 2, ("tp", "2"), 8, "one_gpu"), "tp2@4": (4, 4, ("tp", "2"), 4, "fsdp2@2"),
        "cp4@4": (4, 4, ("cp", "4"), 8, "one_gpu"),
    }


@pytest.mark.parametrize("args, error", [
    (["--runs", "cp2", "--accelerator", "cpu"], "cp2: context parallel needs CUDA (ring attention); not with --accelerator cpu"),
    (["--runs", "ddp", "--gpus", "3"], "ddp@3: --global-batch 16 does not split over its 3 ranks that read different batches"),
    (["--runs", "ep4", "--gpus", "2,6"], "ep4: no GPU count of 2,6 is a multiple of 4"),
])
def test_scale_out_refuses_what_cannot_run_in_one_line(args, error):
    done = _bench("scale_out.py", "--dry-run", *args)
    assert done.returncode == 2 and done.stderr == f"scale_out.py: error: {error}\n"


def test_design_step_measures_what_the_plan_counts(tmp_path):
    out = tmp_path / "design_step.json"
    done = _bench("design_step.py", "--config", "specs/gpt5_moe_tiny.yaml", "--layers", "1", "--num-experts", "3", "--seq-len", "64", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "1 of 2 layers, 3 experts per MoE layer" in done.stdout and "optimizer (excluded)" in done.stdout
    result = json.loads(out.read_text())
    planned, measured = result["planned"], result["measured"]
    assert measured["parameters"] == planned["parameters"] == result["parameters"] * 2  # bf16 weights
    assert measured["gradients"] == planned["gradients"]
    assert measured["activations"] == pytest.approx(planned["activations"], rel=0.1)

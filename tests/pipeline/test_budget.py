"""Training to a time budget on the normal schedule: the meter, the stop, the snapshots, the resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samnnu.defaults import DEFAULT_TRAINER
from samnnu.pipeline.budget import CURVE_FILE, TrainingBudget, process_tree_cpu_seconds, snapshot_name

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
       "PYTHONWARNINGS": "ignore"}
DATASET = "Dataset004_Hippocampus"


def test_process_tree_cpu_time_counts_living_children():
    """A busy child's CPU time is in the tree's total while this process itself stays idle."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 1.0\n"
                                                    "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        own_before, tree_before = time.process_time(), process_tree_cpu_seconds()
        deadline = time.monotonic() + 30
        while process_tree_cpu_seconds() - tree_before < 0.8 and time.monotonic() < deadline:
            time.sleep(0.1)
        grown = process_tree_cpu_seconds() - tree_before
        assert grown >= 0.8, f"the child's CPU time was not counted ({grown:.2f} s)"
        assert time.process_time() - own_before < 0.5  # it was the child's time, not ours
        assert process_tree_cpu_seconds(child.pid) >= 0.6  # the child alone, by pid
    finally:
        child.kill()
        child.wait()


def test_budget_refuses_nonsense():
    with pytest.raises(ValueError, match="clock"):
        TrainingBudget(60, clock="gpu")
    with pytest.raises(ValueError, match="positive"):
        TrainingBudget(0)
    assert snapshot_name(0.25) == "checkpoint_budget_25.pth"


def test_train_api_refuses_budget_with_epochs(data_root):
    from samnnu.errors import SamnnuError
    from samnnu.pipeline.training import train

    with pytest.raises(SamnnuError, match="normal schedule"):
        train(4, 0, epochs=2, budget_minutes=1.0, device="cpu")
    with pytest.raises(SamnnuError, match="positive"):
        train(4, 0, budget_minutes=-1.0, device="cpu")
    with pytest.raises(SamnnuError, match="clock"):
        train(4, 0, budget_minutes=1.0, budget_clock="sundial", device="cpu")


def _private_root(prepared_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(prepared_root / sub, root / sub)
    return root


def _train(root: Path, *extra: str) -> list[str]:
    return [str(BIN / "samnnu_train"), "4", "0", "--no-chain", "--device", "cpu", "--disable-tta",
            "--data-root", str(root), *extra]


@pytest.mark.slow
def test_budgeted_training_stops_keeps_snapshots_and_resumes_with_the_spent_budget(prepared_root, tmp_path):
    """Killed after its first epoch, a 15-second run resumes with what it had spent, not from zero; it
    stops once the budget is spent, on the normal schedule, with checkpoints at 25 % and 50 %."""
    root = _private_root(prepared_root, tmp_path)
    fold = root / "nnUNet_results" / DATASET / f"{DEFAULT_TRAINER}__samnnuPlans__2d" / "fold_0"
    budget_s, per_epoch = 20.0, 5  # short epochs: the tiny model takes about half a second per iteration
    proc = subprocess.Popen(_train(root, "--budget-minutes", str(budget_s / 60), "--iters-per-epoch", str(per_epoch)),
                            env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            curve = fold / CURVE_FILE
            if curve.is_file() and json.loads(curve.read_text())["curve"] \
                    and any((fold / n).is_file() for n in ("checkpoint_latest.pth", "checkpoint_best.pth")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its first epoch could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = json.loads((fold / CURVE_FILE).read_text())
    spent_at_kill = killed["spent_seconds"]
    assert 0 < spent_at_kill < budget_s and not (fold / "checkpoint_final.pth").exists()

    resumed = subprocess.run(_train(root, "--continue"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and f"minutes of the {budget_s / 60:g}-minute budget" in resumed.stdout
    record = json.loads((fold / CURVE_FILE).read_text())
    stop = record["stopped_at"]
    assert budget_s <= stop["spent_seconds"] < budget_s + 10  # stopped at the first step past the budget
    curve = record["curve"]
    assert curve[0] == killed["curve"][0]  # the interrupted run's points are kept
    assert [p["iterations"] for p in curve] == [per_epoch * (i + 1) for i in range(len(curve))]
    # the resumed run counted on from what had been spent: the meter never goes back
    assert all(a["spent_seconds"] < b["spent_seconds"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["iterations"] <= stop["iterations"] <= curve[-1]["iterations"] + per_epoch
    # checkpoints at a quarter and half of the budget, then the final one; the schedule is the normal one
    for key, fraction in (("25", 0.25), ("50", 0.5)):
        snap = record["snapshots"][key]
        assert (fold / snap["file"]).is_file()
        assert fraction * budget_s <= snap["spent_seconds"] <= stop["spent_seconds"]
    assert (fold / "checkpoint_final.pth").is_file()
    settings = json.loads((fold / "samnnu_training.json").read_text())
    assert settings["epochs"] * settings["iters_per_epoch"] == 1000 * 250 and settings["iters_per_epoch"] == per_epoch
    assert settings["budget_minutes"] == pytest.approx(budget_s / 60)

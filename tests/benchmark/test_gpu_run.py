"""The prepared GPU run (benchmarks/gpu/run.py) kept working without a GPU: a CPU smoke run on the
shipped demo cases, tiny encoder, a few seconds of training per model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samnnu.defaults import DEFAULT_TRAINER

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_run_script_runs_on_cpu(tmp_path):
    from samnnu.demo_data import demo_dataset_path

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "SAMNNU_DATA_ROOT"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu" / "run.py"), "--device", "cpu", "--minutes", "0.1",
           "--max-cases", "8", "--encoder", "tiny", "--timing-cases", "1", "--data", str(demo_dataset_path()),
           "--work", str(tmp_path / "work"), "-o", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = json.loads((out / "results.json").read_text())
    assert sorted(state["runs"]) == sorted([f"{DEFAULT_TRAINER}:2d@all", "nnUNetTrainer:3d_fullres@all"])
    raw = tmp_path / "work" / "nnUNet_raw" / "Dataset004_Hippocampus"
    held_out = sorted(p.name for p in (raw / "labelsTs").iterdir())
    assert held_out and all(n.endswith("7.nii.gz") for n in held_out)
    for run in state["runs"].values():
        assert run["budget"]["clock"] == "wall" and run["budget"]["spent_minutes"] >= 0.1
        assert [p["fraction"] for p in run["learning_curve"]][:2] == [0.25, 0.5]
        assert run["test"]["n_cases"] == len(held_out) and run["training_iterations_per_second"] > 0
        curve = json.loads((out / f"curve_{run['trainer']}_{run['configuration']}.json").read_text())
        assert curve["stopped_at"]["iterations"] == run["iterations"]
    throughput = state["encoder_throughput"]
    assert throughput["slices_per_second_fp32"] > 0 and throughput["slices_per_second_bf16"] > 0
    md = (out / "results.md").read_text()
    assert "## Learning curves" in md and "slices/s bf16" in md
    assert (out / "learning_curves.png").is_file()

"""Data-parallel training with torch.distributed: two CPU processes (gloo) on the tiny dataset."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import use_data_root


@pytest.mark.slow
def test_two_gloo_ranks_finish_in_sync_and_write_one_checkpoint(prepared_root, tmp_path, monkeypatch):
    from samnnu.pipeline.distributed import parameters_digest, train_distributed
    from samnnu.safe_io import load_torch_safely

    root = tmp_path / "root"
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(prepared_root / sub, root / sub)
    use_data_root(monkeypatch, root)
    monkeypatch.setenv("SAMNNU_NUM_THREADS", "1")
    result = train_distributed(4, 0, 2, device="cpu", epochs=2, iters_per_epoch=2, mirroring=False, run_chain=False)
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["device"] == "cpu" and r["epochs"] == 2 for r in ranks)  # both ranks finished every epoch
    import json

    plans = json.loads((root / "nnUNet_preprocessed" / "Dataset004_Hippocampus" / "samnnuPlans.json").read_text())
    batch = plans["configurations"]["2d"]["sam"]["batch_size"]
    assert ranks[0]["batch_size"] == ranks[1]["batch_size"] == max(1, round(batch / 2))  # an equal share each
    for key in ("parameters_sha256", "training_parameters_sha256"):  # in sync: weights and their averages
        assert ranks[0][key] == ranks[1][key]
    fold = Path(result["fold_dir"])
    assert sorted(p.name for p in fold.glob("*.pth")) == ["checkpoint_best.pth", "checkpoint_final.pth"]
    # the one final checkpoint holds exactly the ranks' common parameters (those prediction uses)
    import torch

    from samnnu.pipeline.training import get_trainer_class  # noqa: F401  (registers the trainers)

    state = load_torch_safely(fold / "checkpoint_final.pth")["network_weights"]

    class Holder(torch.nn.Module):
        def state_dict(self, *a, **k):
            return state

    assert parameters_digest(Holder()) == ranks[0]["parameters_sha256"]

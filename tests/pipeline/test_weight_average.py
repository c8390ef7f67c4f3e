"""The power-function weight average: what it averages, and that checkpoints keep both weight sets."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from conftest import use_data_root
from samnnu.errors import SamnnuError
from samnnu.trainers.averaging import CHECKPOINT_KEY, PowerAverage, relative_width


def _linear() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    net[0].bias.requires_grad_(False)  # a frozen parameter is left alone
    return net


def test_average_covers_a_fixed_share_of_the_run_whatever_its_length():
    """Weights that grow linearly (w_s = s): an average weighting update s by s**gamma has the mean
    t (gamma + 1) / (gamma + 2), so it lags the last weights by a fixed share of the run."""
    for gamma, t in ((7.0, 300), (7.0, 3000), (3.0, 1000)):
        net = torch.nn.Linear(1, 1, bias=False)
        avg = PowerAverage(net, gamma)
        for s in range(1, t + 1):
            with torch.no_grad():
                net.weight.fill_(float(s))
            avg.update()
        expected = t * (gamma + 1) / (gamma + 2)
        assert avg.average[0].item() == pytest.approx(expected, rel=0.01)
    assert relative_width(7.0) == pytest.approx(0.099, abs=1e-3)


def test_first_update_takes_the_weights_and_constant_weights_stay():
    net = _linear()
    avg = PowerAverage(net, 7.0)
    assert avg.names == ["0.weight", "1.weight", "1.bias"]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update()
    for p, a in zip(avg.params, avg.average):
        assert torch.equal(p, a)
    for _ in range(5):
        avg.update()
    for p, a in zip(avg.params, avg.average):
        assert torch.allclose(p, a)


def test_applied_swaps_in_the_average_and_puts_the_training_weights_back():
    net = _linear()
    avg = PowerAverage(net, 7.0)
    for step in range(4):
        with torch.no_grad():
            net[1].weight.fill_(float(step))
        avg.update()
    training = [p.detach().clone() for p in avg.params]
    averaged = [a.clone() for a in avg.average]
    assert not torch.equal(training[1], averaged[1])
    x = torch.randn(5, 3)
    with avg.applied():
        assert avg.swapped
        assert all(torch.equal(p, a) for p, a in zip(avg.params, averaged))
        state = avg.training_state()  # what training resumes from, also while the average is applied
        with pytest.raises(SamnnuError, match="update"):
            avg.update()
        y_avg = net(x)
    assert not avg.swapped and all(torch.equal(p, t) for p, t in zip(avg.params, training))
    assert all(torch.equal(state["weights"][n], t) for n, t in zip(avg.names, training))
    assert not torch.allclose(y_avg, net(x))


def test_training_state_round_trip_and_a_foreign_state_is_refused():
    net = _linear()
    avg = PowerAverage(net, 7.0)
    for step in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        avg.update()
    state = avg.training_state()
    averaged = [a.clone() for a in avg.average]
    other = _linear()  # a fresh network loaded with the average, as a checkpoint's network_weights load
    other.load_state_dict(dict(net.state_dict(), **{n: a for n, a in zip(avg.names, averaged)}))
    restored = PowerAverage(other, 7.0)
    restored.load_training_state(state)
    assert restored.updates == 3
    assert all(torch.equal(p, q) for p, q in zip(restored.params, avg.params))
    assert all(torch.equal(a, b) for a, b in zip(restored.average, averaged))
    with pytest.raises(SamnnuError, match="not this network's"):
        restored.load_training_state({"updates": 1, "weights": {"2.weight": torch.zeros(1)}})


@pytest.fixture
def own_root(prepared_root, tmp_path, monkeypatch) -> Path:
    """A copy of the prepared data (raw and preprocessed) with results of its own."""
    root = tmp_path / "root"
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(prepared_root / sub, root / sub)
    use_data_root(monkeypatch, root)
    return root


def test_samunet_checkpoints_hold_the_average_for_prediction_and_resume_training(own_root):
    """SAMUNetTrainer averages: its final checkpoint's network weights are the average, the training
    weights ride beside them, and a trainer loading the checkpoint trains on from those."""
    from samnnu.pipeline.training import get_trainer_class, train
    from samnnu.safe_io import load_torch_safely

    result = train(4, 0, trainer="SAMUNetTrainer", epochs=1, iters_per_epoch=3, device="cpu", mirroring=False,
                   run_chain=False, return_trainer=True)
    trainer = result["trainer_object"]
    avg = trainer.weight_average
    assert avg is not None and avg.updates == 3 and not avg.swapped
    checkpoint = load_torch_safely(f"{result['fold_dir']}/checkpoint_final.pth")
    stored = checkpoint[CHECKPOINT_KEY]
    assert stored["updates"] == 3 and stored["gamma"] == 7.0
    differs = 0
    for name, p, a in zip(avg.names, avg.params, avg.average):
        assert torch.equal(checkpoint["network_weights"][name], a)  # prediction loads the average
        assert torch.equal(stored["weights"][name], p.detach())      # training resumes from its own weights
        differs += not torch.equal(a, p.detach())
    assert differs > 0  # three AdamW steps: the average trails the last weights

    # the benchmark script that compares both weight sets writes the training weights as a checkpoint
    spec = importlib.util.spec_from_file_location(
        "weight_averaging", Path(__file__).resolve().parents[2] / "benchmarks" / "weight_averaging.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.training_weights_checkpoint(Path(result["fold_dir"]) / "checkpoint_final.pth",
                                                 own_root / "training_weights.pth")
    extracted = load_torch_safely(written)
    assert CHECKPOINT_KEY not in extracted
    assert extracted["network_weights"].keys() == checkpoint["network_weights"].keys()
    for name, p in zip(avg.names, avg.params):
        assert torch.equal(extracted["network_weights"][name], p.detach())

    cls = get_trainer_class("SAMUNetTrainer")
    plans = dict(trainer.plans_manager.plans, continue_training=True)  # nnunetv2 2.8 reads the flag from the plans
    other = cls(plans=plans, configuration="2d", fold=0, dataset_json=trainer.dataset_json,
                device=torch.device("cpu"))
    other.load_checkpoint(f"{result['fold_dir']}/checkpoint_final.pth")
    assert other.weight_average.updates == 3
    for p, q, a, b in zip(other.weight_average.params, avg.params, other.weight_average.average, avg.average):
        assert torch.equal(p, q) and torch.equal(a, b)

    class WithoutAveraging(cls):  # continued without averaging: on from the training weights, not the average
        weight_average_gamma = None

    plain = WithoutAveraging(plans=dict(plans, continue_training=True), configuration="2d", fold=0,
                             dataset_json=trainer.dataset_json, device=torch.device("cpu"))
    plain.load_checkpoint(f"{result['fold_dir']}/checkpoint_final.pth")
    weights = dict(plain.network.named_parameters())
    assert plain.weight_average is None and all(torch.equal(weights[n], p) for n, p in zip(avg.names, avg.params))


def test_trainers_without_averaging_keep_nnunets_checkpoint(own_root):
    from samnnu.pipeline.training import train
    from samnnu.safe_io import load_torch_safely

    result = train(4, 0, trainer="SAMedLoRATrainer", epochs=1, iters_per_epoch=1, device="cpu", mirroring=False,
                   run_chain=False, return_trainer=True)
    assert result["trainer_object"].weight_average is None
    assert CHECKPOINT_KEY not in load_torch_safely(f"{result['fold_dir']}/checkpoint_final.pth")


def test_gamma_must_be_positive():
    with pytest.raises(SamnnuError, match="gamma"):
        PowerAverage(_linear(), 0.0)

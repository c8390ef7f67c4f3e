"""docs/extending.md, executed.

Every ```python block of the page whose first line is ``# <file>.py`` is an example file. They are
written to a temporary folder and made importable under the names the page gives them
(``samnnu.modeling.bitfit``, ``samnnu.trainers.bitfit``) by extending the packages' ``__path__``; the
encoder block runs as the end of ``samnnu/modeling/encoders.py`` would. The tests then check what the
page promises: the encoder is registered once and builds at the planned sizes with the GFLOP it
declares, the planner plans it, the trainer is found by name (by samnnu and by nnU-Net), its network
builds from real plans, its own test passes, and it trains on the demo data. Everything is undone
afterwards: the encoder is unregistered, the modules forgotten, the trainer registry rescanned.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import samnnu.modeling
import samnnu.modeling.encoders as encoders
import samnnu.trainers
from samnnu.errors import SamnnuError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
# a fenced python block whose first line is a comment naming a .py file
BLOCK = re.compile(r"^```python\n(?P<body># (?P<path>\S+\.py)\b[^\n]*\n.*?)^```", re.S | re.M)
ENCODER_FILE = "samnnu/modeling/encoders.py"
NETWORK_FILE = "samnnu/modeling/bitfit.py"
TRAINER_FILE = "trainers/bitfit.py"
TEST_FILE = "tests/modeling/test_bitfit.py"
ENCODER, TRAINER = "vit_mini", "BitFitTrainer"
SEVEN = {"SAMedLoRATrainer", "SAMMed2DAdapterTrainer", "SAMUNetTrainer", "nnSAMTrainer", "SAM3DAdapterTrainer",
         "SelfPromptTrainer", "ImplicitDecoderTrainer"}
DATASET = "Dataset004_Hippocampus"


def doc_blocks() -> dict[str, str]:
    """The page's example files: path -> code (the naming comment included)."""
    blocks = {}
    for match in BLOCK.finditer(DOC.read_text()):
        assert match.group("path") not in blocks, f"two blocks claim {match.group('path')}"
        blocks[match.group("path")] = match.group("body")
    return blocks


@pytest.fixture
def example_encoder():
    """The page's encoder, registered as if its block ended encoders.py; unregistered afterwards."""
    before = set(encoders.ENCODERS)
    namespace = dict(vars(encoders))  # the block's own globals: encoders.py's names, as at the end of that file
    try:
        exec(compile(doc_blocks()[ENCODER_FILE], f"{DOC}:{ENCODER_FILE}", "exec"), namespace)
        assert set(encoders.ENCODERS) - before == {ENCODER}
        yield encoders.ENCODERS[ENCODER]
    finally:
        for name in set(encoders.ENCODERS) - before:
            del encoders.ENCODERS[name]


@pytest.fixture
def example_modules(tmp_path):
    """The page's network, trainer and test written under ``tmp_path``; the network and trainer
    importable as ``samnnu.modeling.bitfit`` and ``samnnu.trainers.bitfit``. Returns the folder."""
    blocks = doc_blocks()
    for rel in (NETWORK_FILE, TRAINER_FILE, TEST_FILE):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(blocks[rel])
    saved = {pkg: pkg.__path__ for pkg in (samnnu.modeling, samnnu.trainers)}
    samnnu.modeling.__path__ = [*saved[samnnu.modeling], str(tmp_path / "samnnu" / "modeling")]
    samnnu.trainers.__path__ = [*saved[samnnu.trainers], str(tmp_path / "trainers")]
    importlib.invalidate_caches()
    samnnu.trainers.samnnu_trainers.cache_clear()
    try:
        yield tmp_path
    finally:
        for pkg, path in saved.items():
            pkg.__path__ = path
            sys.modules.pop(f"{pkg.__name__}.bitfit", None)
            if hasattr(pkg, "bitfit"):
                delattr(pkg, "bitfit")
        samnnu.trainers.samnnu_trainers.cache_clear()
        assert TRAINER not in samnnu.trainers.samnnu_trainers()  # the registry is back to the real trainers


def load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plans_manager(plans: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return pm, pm.get_configuration("2d")


def check_network(trainer: str, pm, cm, channels: int = 1, classes: int = 3) -> torch.nn.Module:
    """Build ``trainer``'s network from the plans; it maps (2, C, *patch) to (2, K, *patch)."""
    from samnnu.pipeline.training import get_trainer_class

    net = get_trainer_class(trainer).build_network_architecture(pm, cm, channels, classes, False)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, *cm.patch_size))
    assert out.shape == (2, classes, *cm.patch_size)
    return net


# --------------------------------------------------------------------------------------------
# the page itself
# --------------------------------------------------------------------------------------------
def test_the_page_gives_each_example_file_once_and_none_is_in_the_source_tree():
    blocks = doc_blocks()
    assert set(blocks) == {ENCODER_FILE, NETWORK_FILE, TRAINER_FILE, TEST_FILE}
    # one home per idea (docs/architecture.md): the network and the trainer share the idea's name
    assert Path(NETWORK_FILE).stem == Path(TRAINER_FILE).stem == Path(TEST_FILE).stem.removeprefix("test_")
    for rel in (NETWORK_FILE, TRAINER_FILE, TEST_FILE):
        assert not (ROOT / rel).exists(), f"the example {rel} belongs in the page, not in the source tree"
    assert ENCODER not in encoders.ENCODERS and f'"{ENCODER}"' not in (ROOT / ENCODER_FILE).read_text()
    for rel in (NETWORK_FILE, TRAINER_FILE, TEST_FILE):  # each example file is a complete module
        compile(blocks[rel], rel, "exec")
    assert "nnunetv2.training" not in blocks[NETWORK_FILE]  # modeling stays pure PyTorch


# --------------------------------------------------------------------------------------------
# the encoder
# --------------------------------------------------------------------------------------------
def test_example_encoder_is_registered_once_and_builds_at_planned_sizes(example_encoder):
    spec = example_encoder
    assert spec is encoders.get_encoder_spec(ENCODER) and spec.pretrained is None
    with pytest.raises(SamnnuError, match=f"encoder '{ENCODER}' is already registered") as info:
        encoders.register_encoder(dataclasses.replace(spec))
    assert "\n" not in str(info.value)
    for size in (64, 256):
        parts = encoders.build_sam_parts(ENCODER, input_size=size, num_mask_tokens=3)
        assert (parts.stride, parts.embed_dim) == (spec.stride, 128)
        embedding = parts.image_encoder(torch.rand(1, 3, size, size))
        assert embedding.shape == (1, 128, size // spec.stride, size // spec.stride)
    with pytest.raises(SamnnuError, match="not a positive multiple of 16"):
        encoders.build_sam_parts(ENCODER, input_size=72, num_mask_tokens=3)


def test_example_encoder_declares_the_gflop_the_counter_gives(example_encoder):
    from torch.utils.flop_counter import FlopCounterMode

    spec = example_encoder
    parts = encoders.build_sam_parts(ENCODER, input_size=spec.native_size, num_mask_tokens=4)
    with FlopCounterMode(display=False) as counter:
        parts.image_encoder(torch.zeros(1, 3, spec.native_size, spec.native_size))
    assert spec.gflop_at_native == pytest.approx(counter.get_total_flops() / 1e9, rel=0.05)


def test_example_encoder_through_the_planner_rules(example_encoder):
    from samnnu.plans.samnnu_planner import estimate_training_memory_gb, plan_batch_size, plan_input_size

    spec = example_encoder
    assert plan_input_size((56, 40), spec) == 64  # the hippocampus 2d patch
    assert plan_input_size((600, 500), spec) == spec.native_size  # never above the native size
    assert estimate_training_memory_gb(spec, 64, 2) == pytest.approx(
        spec.memory_fixed_gb + 2 * spec.memory_per_sample_gb_at_native / 16)
    batch, why = plan_batch_size(spec, 64, (56, 40), 1e6, "cpu", 8.0)
    assert batch >= 2 and set(why["limits"]) == {"memory", "dataset_5_percent", "cpu_compute"}


def test_register_encoder_refuses_specs_the_planner_cannot_use():
    tiny = encoders.ENCODERS["tiny"]
    before = dict(encoders.ENCODERS)
    bad = {
        "stride": dict(stride=3),  # size divisor 16 is not a multiple of 3
        "native_size": dict(native_size=72),
        "gflop_at_native": dict(gflop_at_native=0.0),
        "pretrained must be one of": dict(pretrained="internet"),
        "needs a signature": dict(pretrained="user"),
        "pixel_mean and pixel_std": dict(pixel_mean=(0.5, 0.5, 0.5)),
        "non-empty word": dict(name="my encoder"),
        "attention_windows must be": dict(attention_windows=((4, 14),)),  # blocks missing
    }
    for message, change in bad.items():
        with pytest.raises(SamnnuError, match=message) as info:
            encoders.register_encoder(dataclasses.replace(tiny, **{"name": "tiny_variant", **change}))
        assert "\n" not in str(info.value)
    with pytest.raises(SamnnuError, match="takes an EncoderSpec"):
        encoders.register_encoder({"name": "tiny_variant"})
    assert encoders.ENCODERS == before


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
def test_registry_finds_the_example_trainer_by_name(example_modules):
    from samnnu.pipeline.training import get_trainer_class
    from samnnu.trainers.base import SAMTrainerBase

    trainers = samnnu.trainers.samnnu_trainers()
    assert TRAINER in trainers and SEVEN <= set(trainers)
    cls = get_trainer_class(TRAINER)
    assert cls is trainers[TRAINER] and cls.__module__ == "samnnu.trainers.bitfit"
    assert issubclass(cls, SAMTrainerBase) and not inspect.isabstract(cls) and cls.patch_dimensions == (2,)
    from samnnu.modeling.bitfit import BitFitNet

    assert BitFitNet.__module__ == "samnnu.modeling.bitfit"


def test_nnunet_finds_the_example_trainer_through_ext_trainer(example_modules, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from samnnu.trainers.base import SAMTrainerBase

    # in a real checkout the file is in trainers/, the folder samnnu's commands give nnU-Net
    monkeypatch.setenv("nnUNet_extTrainer", str(example_modules / "trainers"))
    cls = recursive_find_trainer_class_by_name(TRAINER)
    assert cls.__name__ == TRAINER and issubclass(cls, SAMTrainerBase)


@pytest.mark.slow
def test_the_examples_own_test_passes(example_modules):
    module = load_file(example_modules / TEST_FILE, "extending_example_test_bitfit")
    tests = [fn for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    assert len(tests) >= 3
    for fn in tests:
        fn()


def test_example_network_works_with_the_example_encoder(example_encoder, example_modules):
    from samnnu.modeling.bitfit import BitFitNet, is_bias_parameter

    net = BitFitNet(encoder=ENCODER, input_size=64, in_channels=1, num_classes=3, intensity_windows=[(-2.0, 2.0)])
    assert net(torch.randn(2, 1, 56, 40)).shape == (2, 3, 56, 40)
    trainable = {n for n, p in net.image_encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.image_encoder.named_parameters() if is_bias_parameter(n)}
    assert any(".attn.qkv.bias" in n for n in trainable)  # the ViT's biases, not only its norms'


# --------------------------------------------------------------------------------------------
# with real plans and data (the shipped demo cases, planned for the tiny encoder)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_network_builds_from_real_plans(example_modules, data_root):
    plans = json.loads((data_root / "nnUNet_preprocessed" / DATASET / "samnnuPlans.json").read_text())
    pm, cm = plans_manager(plans)
    assert cm.configuration["sam"]["encoder"] == "tiny" and len(cm.patch_size) == 2
    check_network(TRAINER, pm, cm)


@pytest.mark.slow
def test_example_encoder_is_planned_and_used_by_trainers(example_encoder, example_modules, data_root):
    """What ``samnnu_plan_and_preprocess -d 4 --encoder vit_mini`` plans (under another plans name, so the
    shared plans stay as they are), and networks of two trainers built from it."""
    from samnnu.plans.samnnu_planner import SAMnnUPlanner

    plans_file = data_root / "nnUNet_preprocessed" / DATASET / "samnnuPlans_vit_mini.json"
    try:
        planner = SAMnnUPlanner(4, plans_name=plans_file.stem, encoder=ENCODER, device_type="cpu",
                                device_memory_gb=8)
        plans = planner.plan_experiment()
        assert json.loads(plans_file.read_text())["samnnu"]["encoder"] == ENCODER
    finally:
        plans_file.unlink(missing_ok=True)
    pm, cm = plans_manager(plans)
    sam = cm.configuration["sam"]
    assert tuple(cm.patch_size) == (56, 40)  # the patch the page quotes
    assert (sam["encoder"], sam["input_size"], sam["embedding_grid"]) == (ENCODER, 64, 8)
    assert sam["batch_size"] >= 2 and sam["fits_device_memory"]
    for trainer in (TRAINER, "SAMedLoRATrainer"):
        check_network(trainer, pm, cm)


@pytest.mark.slow
def test_example_trainer_refuses_3d_patches_before_any_work(example_modules, data_root):
    from samnnu.pipeline.training import train

    with pytest.raises(SamnnuError, match=f"{TRAINER} trains 2D patches; configuration '3d_fullres' has 3D"):
        train(4, 0, trainer=TRAINER, configuration="3d_fullres", epochs=1, iters_per_epoch=1, device="cpu")
    assert not (data_root / "nnUNet_results" / DATASET / f"{TRAINER}__samnnuPlans__3d_fullres").exists()


@pytest.mark.slow
def test_example_trainer_trains_on_the_demo_data(example_modules, data_root):
    from samnnu.modeling.bitfit import BitFitNet
    from samnnu.pipeline.training import train

    model_dir = data_root / "nnUNet_results" / DATASET / f"{TRAINER}__samnnuPlans__2d"
    try:
        result = train(4, 0, trainer=TRAINER, epochs=1, iters_per_epoch=2, device="cpu", mirroring=False,
                       run_chain=False)
        fold_dir = model_dir / "fold_0"
        assert Path(result["fold_dir"]) == fold_dir and result["trainer"] == TRAINER
        checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 1
        # the optimiser saw exactly the parameters the network marks trainable
        plans = json.loads((data_root / "nnUNet_preprocessed" / DATASET / "samnnuPlans.json").read_text())
        sam = plans["configurations"]["2d"]["sam"]
        net = BitFitNet(encoder="tiny", input_size=sam["input_size"], in_channels=1, num_classes=3,
                        intensity_windows=sam["intensity_windows"])
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        total = sum(p.numel() for p in net.parameters())
        log = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
        assert f"Parameters: {total} total, {trainable} trainable" in log
        assert set(checkpoint["network_weights"]) == set(net.state_dict())
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)

"""Train one fold, then run the fixed chain: validation -> postprocessing -> evaluation -> report."""
from __future__ import annotations

import time
from pathlib import Path

from samnnu.config import configure_threads, current_paths, setup_environment
from samnnu.datasets import dataset_name, ensure_splits
from samnnu.defaults import (
    CHECKPOINTS_NEWEST_FIRST,
    DEFAULT_CONFIGURATION,
    DEFAULT_TRAINERS,
    FINAL_CHECKPOINT,
    PLANS_NAME,
    RUN_SETTINGS,
)
from samnnu.errors import SamnnuError
from samnnu.pipeline.budget import CLOCKS, CURVE_FILE, BudgetSpent, TrainingBudget
from samnnu.safe_io import (
    check_torch_archive,
    load_torch_safely,
    read_json,
    remove_stale_tmp,
    weights_only_loading,
    write_atomic,
    write_json_atomic,
)
from samnnu.trainers import samnnu_trainers

#: iterations per epoch of a budgeted run: the budget is recorded (and resumable) at every epoch end
BUDGET_ITERS_PER_EPOCH = 50


def get_trainer_class(name: str):
    """A samnnu trainer, or any trainer nnU-Net itself can find, by class name."""
    trainers = samnnu_trainers()
    if name in trainers:
        return trainers[name]
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise SamnnuError(f"unknown trainer '{name}'; samnnu trainers: {', '.join(trainers)} "
                          f"(or any nnU-Net trainer such as nnUNetTrainer)") from None


def pick_device(device: str | None):
    import torch  # local: torch takes seconds to import

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise SamnnuError(f"unknown device '{device}' (use cpu, cuda or mps)")
    if device == "cuda" and not torch.cuda.is_available():
        raise SamnnuError("--device cuda was asked for but no CUDA GPU is visible")
    return torch.device(device)


def _resume(trainer, fold_dir: Path) -> bool:
    """Load the newest intact checkpoint of an interrupted run; True when training had already finished.

    Checkpoints are tried newest first (final, latest, best); a truncated or damaged one is skipped with
    a line saying so. A checkpoint that would run code is refused (SamnnuError), never loaded.
    """
    for fname in CHECKPOINTS_NEWEST_FIRST:
        path = fold_dir / fname
        if not path.is_file():
            continue
        try:
            load_torch_safely(path)
        except SamnnuError as e:
            if "refused" in str(e):
                raise
            print(f"samnnu: skipping {e}")
            continue
        with weights_only_loading():
            trainer.load_checkpoint(str(path))
        print(f"samnnu: resuming from {path} (epoch {trainer.current_epoch})")
        return fname == FINAL_CHECKPOINT
    print(f"samnnu: no intact checkpoint in {fold_dir}; starting a new training")
    return False


def _atomic_checkpoints(trainer) -> None:
    """Make the trainer's checkpoints atomic: written to a temporary file, checked, then renamed, so a
    crash or a full disk during a save leaves the previous checkpoint intact."""
    original = trainer.save_checkpoint

    def save_checkpoint(filename: str) -> None:
        if trainer.local_rank != 0 or trainer.disable_checkpointing:
            return original(filename)
        remove_stale_tmp(Path(filename).parent)  # left by a run killed during a save
        write_atomic(filename, lambda tmp: original(str(tmp)), check_torch_archive)

    trainer.save_checkpoint = save_checkpoint


def default_plans_name(trainer: str | None, plans: str | None = None) -> str:
    """The plans a trainer uses unless the user names them: samnnuPlans for samnnu's trainers (and for a
    trainer still to be chosen from them), nnUNetPlans for nnU-Net's own."""
    if plans:
        return plans
    return PLANS_NAME if trainer is None or trainer in samnnu_trainers() else "nnUNetPlans"


def default_model(plans_dict: dict, trainer: str | None, configuration: str | None) -> tuple[str, str]:
    """(trainer, configuration) with the plans deciding what the user left open.

    The configuration defaults to the planner's recommendation (``plans["samnnu"]``; ``2d`` when the
    plans have none, e.g. nnU-Net's own); the trainer to ``SAM3DAdapterTrainer`` for a 3D
    configuration and ``SAMUNetTrainer`` otherwise (:data:`samnnu.defaults.DEFAULT_TRAINERS`).
    """
    configuration = configuration or plans_dict.get("samnnu", {}).get("recommended_configuration",
                                                                      DEFAULT_CONFIGURATION)
    if trainer is None:
        cfg = plans_dict.get("configurations", {}).get(configuration, {})
        trainer = DEFAULT_TRAINERS[3 if len(cfg.get("patch_size", ())) == 3 else 2]
    return trainer, configuration


def train(dataset: str | int, fold: int | str, *, trainer: str | None = None,
          configuration: str | None = None, plans: str | None = None, epochs: int | None = None,
          iters_per_epoch: int | None = None, device: str | None = None, continue_training: bool = False,
          mirroring: bool = True, run_chain: bool = True, sam_checkpoint: str | None = None,
          train_cases: list[str] | None = None, budget_minutes: float | None = None,
          budget_clock: str = "wall", return_trainer: bool = False, save_probabilities: bool = False) -> dict:
    """Train ``trainer`` on one fold of a preprocessed dataset and (by default) run the fixed chain.

    Args:
        trainer, configuration: default from the plans (:func:`default_model`): the recommended
            configuration, and the 2D or 3D SAM trainer that fits it.
        plans: plans name; default ``samnnuPlans`` for samnnu trainers, ``nnUNetPlans`` otherwise.
        epochs, iters_per_epoch: training budget; validation iterations per epoch are a fifth of the
            training ones. With ``continue_training`` they default to the interrupted run's.
        mirroring: test-time mirroring in validation (stored in the checkpoint for prediction too).
        sam_checkpoint: the user's SAM checkpoint (``vit_*``, ``mobilesam``); overrides the plans' one.
        train_cases: train on these cases only (each must be one of the fold's training cases); the
            fold's validation cases are unchanged. Used for label-efficiency experiments.
        budget_minutes: train on the trainer's normal full-length schedule (its learning rate decays
            over all of it) and stop once this many minutes of ``budget_clock`` are spent ("wall", or
            "cpu": CPU time of the training processes; see :mod:`samnnu.pipeline.budget`). Epochs
            are cut into 50 iterations (the schedule stays the normal one), snapshots are kept at
            25 % and 50 % of the budget, and ``budget_curve.json`` records the learning curve.
            Not combined with ``epochs`` (the schedule is the trainer's).
        save_probabilities: keep the validation probabilities (``nnUNetv2_train --npz``), for ensembles.
        return_trainer: put the trainer itself in the result (``trainer_object``; used by the
            data-parallel ranks of :mod:`samnnu.pipeline.distributed`).
    Returns a dict with the fold folder, wall times and the evaluation summary (and ``budget``, the
    budget record, when one was given).
    """
    setup_environment()
    configure_threads()
    for what, value in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise SamnnuError(f"{what} must be a whole number of at least 1, got {value!r}")
    if budget_minutes is not None:
        if not budget_minutes > 0:
            raise SamnnuError(f"budget must be a positive number of minutes, got {budget_minutes!r}")
        if epochs is not None:
            raise SamnnuError("a minutes budget runs the trainer's normal schedule: give no number of epochs")
        if budget_clock not in CLOCKS:
            raise SamnnuError(f"budget clock must be one of {', '.join(CLOCKS)}, got {budget_clock!r}")
    if trainer is not None:
        get_trainer_class(trainer)  # an unknown name is the error to report, not the plans it would use
    name = dataset_name(dataset)
    plans_name = default_plans_name(trainer, plans)
    pre = current_paths().preprocessed / name
    plans_dict = read_json(pre / f"{plans_name}.json", f"plans file (run samnnu_plan_and_preprocess -d {dataset})")
    trainer, configuration = default_model(plans_dict, trainer, configuration)
    trainer_class = get_trainer_class(trainer)
    dataset_json = read_json(pre / "dataset.json", "dataset.json of the preprocessed dataset")
    if configuration not in plans_dict["configurations"]:
        raise SamnnuError(f"{pre / (plans_name + '.json')}: no configuration '{configuration}' "
                          f"(available: {', '.join(plans_dict['configurations'])})")
    dims = len(plans_dict["configurations"][configuration].get("patch_size", ()))
    wanted = getattr(trainer_class, "patch_dimensions", None)
    if wanted is not None and dims not in wanted:
        raise SamnnuError(f"{trainer} trains {' or '.join(f'{d}D' for d in wanted)} patches; configuration "
                          f"'{configuration}' has {dims}D patches")
    if sam_checkpoint is not None:
        if not Path(sam_checkpoint).is_file():
            raise SamnnuError(f"{sam_checkpoint}: SAM checkpoint not found")
        sam_block = plans_dict["configurations"][configuration].get("sam")
        if sam_block is None:
            raise SamnnuError(f"configuration '{configuration}' of {plans_name} has no sam block for --sam-checkpoint")
        sam_block["sam_checkpoint"] = str(Path(sam_checkpoint).resolve())
    fold = _check_fold(fold, ensure_splits(name, configuration, plans_name))
    dev = pick_device(device)

    plans_dict["continue_training"] = continue_training  # nnunetv2 2.8 passes this flag inside the plans
    t = trainer_class(plans=plans_dict, configuration=configuration, fold=fold, dataset_json=dataset_json,
                      device=dev)
    fold_dir = Path(t.output_folder)
    settings_file = fold_dir / RUN_SETTINGS
    previous = read_json(settings_file, "settings of the interrupted run") \
        if continue_training and settings_file.is_file() else {}
    budget_minutes = budget_minutes if budget_minutes is not None else previous.get("budget_minutes")
    budget_clock = previous.get("budget_clock", budget_clock) if previous.get("budget_minutes") else budget_clock
    if budget_minutes is not None and not previous:
        # the normal schedule, cut into short epochs so the budget is checked and recorded often
        normal = t.num_epochs * t.num_iterations_per_epoch
        iters_per_epoch = iters_per_epoch or min(BUDGET_ITERS_PER_EPOCH, t.num_iterations_per_epoch)
        epochs = max(1, normal // iters_per_epoch)
    epochs = epochs or previous.get("epochs")
    iters_per_epoch = iters_per_epoch or previous.get("iters_per_epoch")
    train_cases = train_cases if train_cases is not None else previous.get("train_cases")
    if train_cases is not None:
        _restrict_training_cases(t, list(train_cases))
    if epochs:
        t.num_epochs = int(epochs)
    if iters_per_epoch:
        t.num_iterations_per_epoch = int(iters_per_epoch)
        t.num_val_iterations_per_epoch = max(1, int(iters_per_epoch) // 5)
    # checkpoint_latest every epoch; a budgeted run's short epochs: every 250 iterations, as normal epochs do
    t.save_every = max(1, 250 // t.num_iterations_per_epoch) if budget_minutes is not None else 1
    _atomic_checkpoints(t)
    write_json_atomic(settings_file, {"epochs": t.num_epochs, "iters_per_epoch": t.num_iterations_per_epoch,
                                       "trainer": trainer, "plans": plans_name, "configuration": configuration,
                                       "device": str(dev), "mirroring": mirroring, "train_cases": train_cases,
                                       "budget_minutes": budget_minutes, "budget_clock": budget_clock})

    finished = _resume(t, fold_dir) if continue_training else False
    budget = None
    if budget_minutes is not None and not finished:
        budget = TrainingBudget(budget_minutes * 60, budget_clock)
        t.show_progress = False  # the budget's bar (minutes) replaces the iteration bar
        budget.attach(t, resume=continue_training)
    start = time.time()
    if not finished:
        if not mirroring:
            _disable_mirroring(t)
        try:
            t.run_training()
        except BudgetSpent as spent:
            t.print_to_log_file(f"Stopping: {spent}")
            t.on_train_end()  # as at the last epoch: final checkpoint, data loaders stopped
        except BaseException:
            _stop_data_loaders(t)  # else their threads die noisily when the process exits
            raise
    train_seconds = time.time() - start
    result = {"fold_dir": str(fold_dir), "train_seconds": train_seconds, "trainer": trainer, "plans": plans_name,
              "configuration": configuration, "fold": fold, "device": str(dev)}
    if return_trainer:
        result["trainer_object"] = t
    if budget_minutes is not None:
        result["budget"] = budget.finish() if budget is not None else finished_budget_record(fold_dir, t)
    if run_chain:
        # local: pulls in torch, segment_anything and scipy (slow to import)
        from samnnu.pipeline.chain import run_fold_chain

        result.update(run_fold_chain(t, train_seconds=train_seconds, save_probabilities=save_probabilities))
    return result


def finished_budget_record(fold_dir: Path, trainer) -> dict:
    """The budget record of a run that had already finished. A run killed between its final checkpoint
    and its last record has no ``stopped_at``: rebuilt from the record's last values and the final
    checkpoint's iterations."""
    record = read_json(fold_dir / CURVE_FILE, "budget record")
    if "stopped_at" not in record:
        record["stopped_at"] = {"iterations": trainer.current_epoch * trainer.num_iterations_per_epoch,
                                "spent_seconds": record["spent_seconds"], "wall_seconds": record["wall_seconds"]}
        write_json_atomic(fold_dir / CURVE_FILE, record)
    return record


def _stop_data_loaders(trainer) -> None:
    """Shut down nnU-Net's background data loaders after a failed or interrupted training."""
    for name in ("dataloader_train", "dataloader_val"):
        loader = getattr(trainer, name, None)
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            try:
                finish()
            except Exception:  # already broken: nothing more to stop
                pass


def _check_fold(fold: int | str, splits: list[dict]) -> int | str:
    """``fold`` as nnU-Net takes it ('all' or an int), refused unless the splits define it (nnU-Net would
    silently train on a random 80:20 split instead)."""
    if fold == "all":
        return fold
    try:
        fold = int(fold)
    except (TypeError, ValueError):
        raise SamnnuError(f"fold '{fold}' is neither a number nor 'all'") from None
    if not 0 <= fold < len(splits):
        raise SamnnuError(f"fold {fold} does not exist: the dataset's splits_final.json has folds 0-{len(splits) - 1} "
                          f"(or use 'all')")
    return fold


def _restrict_training_cases(trainer, cases: list[str]) -> None:
    """Make the trainer's split return only ``cases`` for training (its validation cases unchanged)."""
    original = trainer.do_split
    tr_keys, _ = original()
    unknown = sorted(set(cases) - set(tr_keys))
    if unknown:
        raise SamnnuError(f"training cases {', '.join(unknown[:5])} are not training cases of fold {trainer.fold}")
    if not cases:
        raise SamnnuError("train_cases is empty")
    wanted = set(cases)

    def do_split():
        tr, val = original()
        return [k for k in tr if k in wanted], val

    trainer.do_split = do_split


def _disable_mirroring(trainer) -> None:
    """Keep nnU-Net's mirroring augmentation in training but switch test-time mirroring off."""
    original = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def configure():
        out = original()
        trainer.inference_allowed_mirroring_axes = None
        return out

    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = configure

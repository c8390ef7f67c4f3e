"""samnnu's trainers: :class:`~samnnu.trainers.base.SAMTrainerBase` and one module per seed idea.

The registry is the package itself: every concrete ``nnUNetTrainer`` subclass defined in a module here
is a samnnu trainer, found by class name, exactly as nnU-Net finds it through ``nnUNet_extTrainer``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

_NOT_TRAINERS = {"averaging", "base", "schedules"}


@functools.lru_cache(maxsize=None)
def samnnu_trainers() -> dict[str, type]:
    """Every samnnu trainer by class name (imports the trainer modules of this package once)."""
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_TRAINERS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__
                    and not inspect.isabstract(obj)):
                found[name] = obj
    return dict(sorted(found.items()))

"""The one place where samnnu reads environment variables.

nnU-Net finds its three folders through ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results``. samnnu never crashes because they are unset: :func:`setup_environment` fills in
defaults under a data root (``--data-root`` on the command line, else ``SAMNNU_DATA_ROOT``, else
``~/samnnu_data``) and says so once. It also points ``nnUNet_extTrainer`` at samnnu's trainers so
that nnU-Net's own ``nnUNetv2_predict`` can find them again by name, and picks worker counts that
suit the machine. Call it before importing anything from nnunetv2 (``nnunetv2.configuration``
reads ``nnUNet_def_n_proc`` at import time).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import samnnu.trainers
from samnnu.errors import SamnnuError

_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_announced = False


@dataclass(frozen=True)
class Paths:
    raw: Path
    preprocessed: Path
    results: Path


def trainers_folder() -> Path:
    """Folder holding samnnu's trainer modules (the installed ``samnnu.trainers`` package)."""
    return Path(samnnu.trainers.__file__).resolve().parent


def default_data_root() -> Path:
    return Path(os.environ.get("SAMNNU_DATA_ROOT", str(Path.home() / "samnnu_data"))).expanduser()


def setup_environment(data_root: str | os.PathLike | None = None, quiet: bool = False) -> Paths:
    """Make nnU-Net's folders and settings usable; return the three folders.

    Args:
        data_root: when given, the three folders are put under it, overriding the environment.
            Otherwise variables that are already set are kept and only missing ones get defaults.
        quiet: do not print which defaults were chosen.
    """
    global _announced
    root = Path(data_root).expanduser().resolve() if data_root is not None else default_data_root()
    chosen = []
    for name in _FOLDERS:
        if data_root is not None or not os.environ.get(name):
            os.environ[name] = str(root / name)
            chosen.append(name)
    for name in _FOLDERS:
        Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
    if chosen and data_root is None and not quiet and not _announced:
        print(f"samnnu: {', '.join(chosen)} not set; using folders under {root}", file=sys.stderr)
        _announced = True

    trainers = str(trainers_folder())
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainers not in ext:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(ext + [trainers])

    cpus = available_cores()
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(cpus, 8))))
    # nnU-Net's augmentation workers: on a small machine they compete with the network for the same
    # cores, so keep them few (nnU-Net needs at least one).
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, min(cpus // 2, 12))))
    return current_paths()


def available_cores() -> int:
    """The CPU cores this process may use: ``SAMNNU_NUM_THREADS`` when set (for a machine shared with other
    jobs), else the cores of its affinity mask (what a container or ``taskset`` allows, which
    ``os.cpu_count()`` does not see)."""
    value = os.environ.get("SAMNNU_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise SamnnuError(f"SAMNNU_NUM_THREADS must be a whole number of at least 1, got {value!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads() -> int:
    """Give torch's intra-op pool one thread per available core (:func:`available_cores`); return that count.

    torch's default counts every core of the machine, and so does each of nnU-Net's worker processes:
    several processes on a small or shared machine then run more threads than there are cores, and
    everything slows down.
    """
    import torch  # local: torch takes seconds to import

    n = available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def current_paths() -> Paths:
    return Paths(*(Path(os.environ[name]) for name in _FOLDERS))


def num_processes() -> int:
    return int(os.environ.get("nnUNet_def_n_proc", "1"))


#: at most this many available cores: samnnu_predict preprocesses and exports in its own process
IN_PROCESS_PREDICTION_CORES = 2


def prediction_processes(device_type: str = "cpu") -> tuple[int, int]:
    """Worker processes for nnU-Net's preprocessing and its export while predicting on ``device_type``:
    (0, 0), everything in this process, when the network runs on the CPU and at most
    :data:`IN_PROCESS_PREDICTION_CORES` cores are available (:func:`available_cores`, so
    ``SAMNNU_NUM_THREADS`` decides on a shared machine). There a worker only competes with torch's threads
    for the same cores, and starting one (a fresh interpreter that imports torch and nnU-Net) costs more
    than the overlap saves (docs/benchmarks.md, "Prediction speed"). Otherwise (more cores, or a GPU that
    the workers' CPU work can overlap) one preprocessing worker and up to two export workers."""
    if device_type == "cpu" and available_cores() <= IN_PROCESS_PREDICTION_CORES:
        return 0, 0
    return 1, min(2, num_processes())

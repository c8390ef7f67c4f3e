"""Train on the normal full-length schedule and stop at a compute budget, as a user who stops early would.

A :class:`TrainingBudget` is attached to an nnU-Net trainer (samnnu's or nnU-Net's own) before
``run_training``. It meters the training after every iteration and

- saves ``checkpoint_budget_25.pth`` / ``checkpoint_budget_50.pth`` when 25 % / 50 % of the budget is
  spent (the points of the learning curve that are validated afterwards; the end of the budget is the
  ordinary ``checkpoint_final.pth``);
- records, at every epoch end, the iterations done, the budget spent and nnU-Net's pseudo-Dice in
  ``budget_curve.json`` (atomically: an interrupted run resumes with the budget it had spent);
- raises :class:`BudgetSpent` from the training step that exhausts the budget; the caller then ends
  the training as nnU-Net does at its last epoch (``on_train_end``: final checkpoint, loaders stopped).

Two clocks:

- ``"cpu"``: CPU seconds (user + system) of the training process and all its descendants (nnU-Net's
  data-augmentation workers). Other jobs on a shared machine slow the run down but do not spend its
  budget, so the budget means the same compute whatever else runs. It counts every thread: with
  torch on 2 threads, 60 CPU-minutes are about 30-40 minutes of wall clock when the machine is idle.
- ``"wall"``: elapsed wall-clock seconds. Used on a GPU, where the CPU time says nothing about the work.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm import tqdm

from samnnu.safe_io import read_json, write_json_atomic

CURVE_FILE = "budget_curve.json"
#: fractions of the budget at which a checkpoint is kept for the learning curve (1.0 is checkpoint_final)
DEFAULT_MARKS = (0.25, 0.5)
CLOCKS = ("cpu", "wall")


class BudgetSpent(Exception):
    """Raised from a training step once the budget is spent; the trainer's state is consistent."""


def snapshot_name(fraction: float) -> str:
    """``checkpoint_budget_25.pth`` for 0.25."""
    return f"checkpoint_budget_{round(100 * fraction)}.pth"


def process_tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (default: this one) and every living
    descendant, plus what their already-finished children used. Reads ``/proc`` (Linux); elsewhere
    only this process's own CPU time is known (:func:`time.process_time`)."""
    root = os.getpid() if pid is None else pid
    if not os.path.isdir("/proc"):
        return time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [root]
    children: dict[int, list[int]] = {}
    for p, pp in parent.items():
        children.setdefault(pp, []).append(p)
    while todo:
        p = todo.pop()
        total += used.get(p, 0)
        todo.extend(children.get(p, ()))
    return total / tick


def _logged(trainer, key: str) -> float | None:
    """The newest value nnU-Net's logger holds for ``key`` (e.g. ``ema_fg_dice``), None if it has none."""
    try:
        return float(trainer.logger.get_value(key, step=-1))
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class TrainingBudget:
    """Stop an nnU-Net trainer after ``seconds`` of ``clock`` (see the module docstring).

    Args:
        seconds: the budget.
        clock: ``"cpu"`` (process-tree CPU time) or ``"wall"``.
        marks: fractions of the budget at which a snapshot checkpoint is saved.
        progress: show a progress bar over the budget (minutes spent / left).
    """

    def __init__(self, seconds: float, clock: str = "wall", marks: tuple[float, ...] = DEFAULT_MARKS,
                 progress: bool = True):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        if not seconds > 0:
            raise ValueError(f"budget must be positive, got {seconds!r} s")
        self.seconds = float(seconds)
        self.clock = clock
        self.marks = tuple(sorted(m for m in marks if 0 < m < 1))
        self.progress = progress
        self.spent = 0.0
        self.curve: list[dict] = []
        self.snapshots: dict[str, dict] = {}
        self._origin: float | None = None
        self._wall_origin: float | None = None
        self._wall_before = 0.0
        self._bar = None
        self._trainer = None
        self._folder: Path | None = None
        self.stopped_at: dict | None = None  # set by finish()

    # -- the meter ----------------------------------------------------------------------------------
    def _read(self) -> float:
        return process_tree_cpu_seconds() if self.clock == "cpu" else time.monotonic()

    def _update(self) -> None:
        now = self._read()
        if self._origin is None:  # first call: continue from what an interrupted run had spent
            self._origin = now - self.spent
            self._wall_origin = time.monotonic()
        self.spent = now - self._origin
        if self._bar is not None:
            self._bar.update(round(min(self.spent, self.seconds) / 60, 2) - self._bar.n)

    @property
    def wall_seconds(self) -> float:
        """Wall-clock seconds of training so far (this process and the interrupted ones before it)."""
        return self._wall_before + (time.monotonic() - self._wall_origin if self._wall_origin is not None else 0.0)

    def state(self) -> dict:
        """What ``budget_curve.json`` holds: the budget, what is spent, the snapshots, the per-epoch curve,
        and ``stopped_at`` (iterations, spent and wall seconds) once training has ended."""
        state = {"budget_seconds": self.seconds, "clock": self.clock, "spent_seconds": self.spent,
                 "wall_seconds": self.wall_seconds, "snapshots": self.snapshots, "curve": self.curve}
        if self.stopped_at is not None:
            state["stopped_at"] = self.stopped_at
        return state

    # -- attaching to a trainer ---------------------------------------------------------------------
    def attach(self, trainer, *, resume: bool = False) -> None:
        """Wrap ``trainer.train_step`` and ``trainer.on_epoch_end``; with ``resume``, continue from the
        budget recorded in the fold folder (points after the resumed epoch are dropped)."""
        self._trainer = trainer
        self._folder = Path(trainer.output_folder)
        recorded = self._folder / CURVE_FILE
        if resume and recorded.is_file():
            before = read_json(recorded, "budget record of the interrupted run")
            if before.get("clock") == self.clock:
                self.curve = [p for p in before.get("curve", []) if p["epoch"] < trainer.current_epoch]
                last = self.curve[-1] if self.curve else {"spent_seconds": 0.0, "wall_seconds": 0.0}
                self.spent, self._wall_before = last["spent_seconds"], last["wall_seconds"]
                self.snapshots = {k: v for k, v in before.get("snapshots", {}).items()
                                  if v["spent_seconds"] <= self.spent and (self._folder / v["file"]).is_file()}
        step, epoch_end, train_start = trainer.train_step, trainer.on_epoch_end, trainer.on_train_start
        self._step_in_epoch = 0

        def on_train_start():
            train_start()
            if self.progress:
                self._bar = tqdm(total=round(self.seconds / 60, 2), initial=round(self.spent / 60, 2),
                                 desc=f"training {type(trainer).__name__} fold {trainer.fold} ({self.clock} minutes)",
                                 unit="min", dynamic_ncols=True, mininterval=1.0,
                                 bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}]")

        def train_step(batch):
            if self._origin is None:
                self._update()
            out = step(batch)
            self._step_in_epoch += 1
            self._update()
            for mark in self.marks:
                key = f"{round(100 * mark)}"
                if key not in self.snapshots and self.spent >= mark * self.seconds:
                    trainer.save_checkpoint(str(self._folder / snapshot_name(mark)))
                    self.snapshots[key] = {"file": snapshot_name(mark), "iterations": self.iterations,
                                           "spent_seconds": self.spent, "wall_seconds": self.wall_seconds}
                    self._write()
            if self.spent >= self.seconds:
                raise BudgetSpent(f"budget of {self.seconds / 60:g} {self.clock} minutes spent after "
                                  f"{self.iterations} iterations")
            return out

        def on_epoch_end():
            epoch = trainer.current_epoch
            epoch_end()
            self._step_in_epoch = 0
            self._update()
            self.curve.append({"epoch": epoch, "iterations": (epoch + 1) * trainer.num_iterations_per_epoch,
                               "spent_seconds": self.spent, "wall_seconds": self.wall_seconds,
                               "pseudo_dice": _logged(trainer, "mean_fg_dice"),
                               "ema_pseudo_dice": _logged(trainer, "ema_fg_dice")})
            self._write()

        trainer.on_train_start, trainer.train_step, trainer.on_epoch_end = on_train_start, train_step, on_epoch_end

    @property
    def iterations(self) -> int:
        t = self._trainer
        return t.current_epoch * t.num_iterations_per_epoch + self._step_in_epoch

    def finish(self) -> dict:
        """Close the progress bar, write and return the final record (``stopped_at`` = iterations done)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._update()
        self.stopped_at = {"iterations": self.iterations, "spent_seconds": self.spent,
                           "wall_seconds": self.wall_seconds}
        self._write()
        return self.state()

    def _write(self) -> None:
        write_json_atomic(self._folder / CURVE_FILE, self.state())

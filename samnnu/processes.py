"""No orphans: worker processes die with the command that started them, and SIGTERM unwinds cleanly.

nnU-Net starts data-loader workers (forked) and preprocessing/export workers (spawned), each holding
hundreds of MB. When a samnnu command is killed (``kill -9``, an out-of-memory kill, a closed
terminal), Linux would leave them running. Two mechanisms stop that:

- every child process asks the kernel to kill it when its parent dies (``prctl(PR_SET_PDEATHSIG)``):
  forked children through an ``os.register_at_fork`` hook, spawned children when they import
  :mod:`samnnu.cli` (a spawned child of a console script re-imports the script, which imports it);
- SIGTERM kills the command's worker processes at once and raises :class:`Terminated` in the main
  process, so ``finally`` blocks and context managers (temporary files) run as they do for Ctrl-C.

On systems without ``prctl`` (not Linux) the first mechanism is a no-op.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_hooks_installed = False
_fork_state = threading.local()


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (a BaseException, like Ctrl-C)."""


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; True when that is set up."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _before_fork() -> None:
    _fork_state.parent = os.getpid()
    _fork_state.main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM waits until the child has its own disposition: one arriving before that would be caught by the
    # parent's handler, then dropped when the child resets it, and the child would outlive a Pool's terminate.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _after_fork_in_parent() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _after_fork_in_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler raises; a worker just ends
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a SIGTERM that came meanwhile ends it now
    # The kernel ties the death signal to the thread that forked: only safe when that is the main thread.
    if getattr(_fork_state, "main_thread", False) and die_with_parent():
        if os.getppid() != getattr(_fork_state, "parent", os.getppid()):
            os._exit(1)  # the parent died before the signal was armed


TERMINATE_GRACE_SECONDS = 10.0


def _hard_exit() -> None:
    print(f"{os.path.basename(sys.argv[0])}: terminated (clean-up did not finish in "
          f"{TERMINATE_GRACE_SECONDS:g} s)", file=sys.stderr, flush=True)
    os._exit(143)


def _raise_terminated(signum, frame) -> None:
    stop_children()  # before unwinding closes the queues and managers the workers use
    # Unwinding may wait on a queue whose worker is gone; everything samnnu writes is atomic or
    # resumable, so after a grace period the process simply ends.
    timer = threading.Timer(TERMINATE_GRACE_SECONDS, _hard_exit)
    timer.daemon = True
    timer.start()
    raise Terminated()


def install_command_hooks() -> None:
    """For a command's main process: children die with it, and SIGTERM raises :class:`Terminated`.

    Idempotent; call from the main thread.
    """
    global _hooks_installed
    if not _hooks_installed:
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _hooks_installed = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def adopt_parent_lifetime() -> None:
    """In a process started by :mod:`multiprocessing` (spawned), die with the parent; else do nothing."""
    if multiprocessing.current_process().name != "MainProcess":
        die_with_parent()


def stop_children() -> None:
    """Kill this process's multiprocessing children now (after Ctrl-C or SIGTERM): left to exit handlers,
    workers would fail one by one, each printing a traceback, as the queues they feed close. Background
    threads of this process that fail from then on (multiprocessing's helpers) stay quiet too."""
    threading.excepthook = lambda args: None
    children = multiprocessing.active_children()
    for child in reversed(children):  # newest first: workers before the manager processes they talk to
        try:
            child.kill()
        except (OSError, ValueError, AttributeError):
            pass
    for child in children:
        try:
            child.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass

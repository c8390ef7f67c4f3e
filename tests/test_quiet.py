"""samnnu/quiet.py: which warnings and which console output a command holds back."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from samnnu.quiet import quiet_warnings, third_party_output

# a worker started with the spawn method imports timm for the first time: timm warns at import time
SPAWNED_IMPORT = """
import multiprocessing
from samnnu.quiet import quiet_warnings
if __name__ == "__main__":
    with {context}:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(exec, ("import timm.models.layers",))
    print("done")
"""


@pytest.mark.slow
@pytest.mark.parametrize("context, quiet", [("quiet_warnings()", True),
                                            ("__import__('contextlib').nullcontext()", False)])
def test_spawned_workers_stay_quiet(context, quiet):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", SPAWNED_IMPORT.format(context=context)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert ("FutureWarning" in proc.stderr) is not quiet, proc.stderr


def test_only_third_party_deprecations_are_filtered(monkeypatch):
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setattr(sys, "warnoptions", [])

    def warn(module: str, category: type[Warning]) -> None:
        exec(f"import warnings; warnings.warn('from {module}', {category.__name__})", {"__name__": module})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_warnings():
            warnings.simplefilter("always", RuntimeWarning)  # inside: the third-party filters come first
            warn("timm.models.layers", FutureWarning)
            warn("torch.jit._script", FutureWarning)
            warn("nnunetv2.utilities.foo", DeprecationWarning)
            warn("samnnu.pipeline.planning", FutureWarning)  # samnnu's own: shown
            warn("timm.models", RuntimeWarning)  # not a deprecation: shown
            warn("timmy", FutureWarning)  # a package that merely starts like one: shown
    assert sorted(str(w.message) for w in caught) == ["from samnnu.pipeline.planning", "from timm.models",
                                                       "from timmy"]


def test_user_warning_settings_are_kept(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_warnings():
            assert os.environ["PYTHONWARNINGS"] == "default"
            exec("import warnings; warnings.warn('kept', FutureWarning)", {"__name__": "timm.x"})
    assert [str(w.message) for w in caught] == ["kept"]


def test_environment_for_workers_is_restored(monkeypatch):
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setattr(sys, "warnoptions", [])
    with quiet_warnings():
        assert "ignore::FutureWarning" in os.environ["PYTHONWARNINGS"]
    assert "PYTHONWARNINGS" not in os.environ


def test_output_is_routed_by_the_code_that_prints(capsys):
    nnunet = {"__name__": "nnunetv2.training.fake"}
    with third_party_output(shown=False) as routed:
        print("from the test")  # neither samnnu nor third-party: shown
        exec("print('from nnU-Net')", nnunet)
        exec("import sys; sys.stdout.write('written by nnU-Net\\n')", nnunet)
    assert capsys.readouterr().out == "from the test\n"
    assert routed.held_text() == "from nnU-Net\nwritten by nnU-Net\n"
    with third_party_output(shown=True):
        exec("print('from nnU-Net')", nnunet)
    assert capsys.readouterr().out == "from nnU-Net\n"

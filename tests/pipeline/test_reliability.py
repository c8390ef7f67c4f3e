"""Nothing lost, nothing run, nothing silent (docs/reliability.md).

Model files never run code; checkpoints survive a kill or a full disk during a save and ``--continue``
falls back to an intact one; outputs are checked before a command reports success; truncated and 4D
inputs are refused; workers die with their command; interrupted predictions resume; budgets, folds and
small datasets get one-line errors or stated choices. Tests that start real processes, fill real
(namespaced tmpfs) file systems or plan a dataset carry the ``slow`` marker.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_MODEL, copy_demo_cases, demo_cases, use_data_root
from samnnu.cli import predict_main, report_main, train_main
from samnnu.demo_data import demo_dataset_path
from samnnu.errors import SamnnuError
from samnnu.pipeline.prediction import _intact_output

DATASET = "Dataset004_Hippocampus"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
       "PYTHONWARNINGS": "ignore"}


# --------------------------------------------------------------------------------------------- helpers


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_cli(main, argv) -> int:
    """A console entry point's exit status, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


class Payload:
    """Unpickling this object runs a shell command that creates ``sentinel``."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture
def own_root(trained_folds, tmp_path, monkeypatch) -> Path:
    """A private copy of the prepared data root holding only the tiny model (folds 0 and 1), made current."""
    src = trained_folds.parents[2]

    def ignore(folder, names):
        if Path(folder).name == DATASET and Path(folder).parent.name == "nnUNet_results":
            return [n for n in names if n != TINY_MODEL]
        return []

    root = tmp_path / "root"
    shutil.copytree(src, root, ignore=ignore)
    use_data_root(monkeypatch, root)
    return root


def fold_dir(root: Path, fold: int = 0) -> Path:
    return root / "nnUNet_results" / DATASET / TINY_MODEL / f"fold_{fold}"


def one_case_folder(folder: Path, case: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    src = sorted((demo_dataset_path() / "images").glob("*.nii.gz"))[-1] if case is None \
        else demo_dataset_path() / "images" / f"{case}.nii.gz"
    shutil.copy2(src, folder / "case.nii.gz")
    return folder


def plant_checkpoint_payload(path: Path, sentinel: Path) -> None:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own, trusted file
    checkpoint["logging"]["note"] = Payload(sentinel)
    torch.save(checkpoint, path)


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) descendants of ``pid``, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def wait_for(condition, timeout: float, step: float = 0.005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def small_filesystem_script(mountpoint: Path, size: str, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs of ``size`` mounted on ``mountpoint``, in a private user and
    mount namespace (no root needed, nothing mounted outside it)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs 'unshare -rm' (user namespaces) to mount a small file system")
    mountpoint.mkdir(parents=True, exist_ok=True)
    body = f"mount -t tmpfs -o size={size} tmpfs '{mountpoint}' || exit 99\n{script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", body], capture_output=True, text=True, env=ENV,
                          timeout=600)


# ----------------------------------------------------------------------------- model files never run code


@pytest.mark.parametrize("command", ["predict", "report", "continue"])
def test_checkpoint_payload_never_runs(own_root, tmp_path, capsys, command):
    sentinel = tmp_path / "payload_ran"
    ckpt = fold_dir(own_root) / "checkpoint_final.pth"
    plant_checkpoint_payload(ckpt, sentinel)
    before = ckpt.read_bytes()
    if command == "predict":
        out = tmp_path / "out"
        rc = run_cli(predict_main, ["-i", str(one_case_folder(tmp_path / "in")), "-o", str(out), "-d", "4",
                                    "-f", "0", "--device", "cpu", "--disable-tta"])
        prog = "samnnu_predict"
        assert not list(out.glob("*.nii.gz"))
    elif command == "report":
        rc, prog = run_cli(report_main, [str(fold_dir(own_root))]), "samnnu_report"
    else:
        rc = run_cli(train_main, ["4", "0", "--continue", "--no-chain", "--device", "cpu"])
        prog = "samnnu_train"
    assert rc == 1
    line = one_line_error(capsys, prog)
    assert "checkpoint_final.pth: refused" in line and "posix.system" in line, line
    assert not sentinel.exists(), "the payload ran"
    assert ckpt.read_bytes() == before


@pytest.mark.slow
def test_postprocessing_pickle_is_never_read(own_root, tmp_path, capsys):
    sentinel = tmp_path / "payload_ran"
    model = fold_dir(own_root).parent
    for pkl in (model / "fold_0" / "validation" / "postprocessing.pkl", model / "postprocessing.pkl"):
        pkl.write_bytes(pickle.dumps(Payload(sentinel)))
    inp = one_case_folder(tmp_path / "in")
    for folds in (["0"], ["0", "1"]):
        out = tmp_path / f"out_{len(folds)}"
        assert run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-d", "4", "-f", *folds, "--device", "cpu",
                                      "--disable-tta"]) == 0
        assert (out / "case.nii.gz").is_file()
    assert not sentinel.exists(), "the payload ran"
    assert "postprocessing.pkl is not used" in capsys.readouterr().err  # the ensemble has no JSON beside it


def test_postprocessing_json_names_only_known_functions(own_root, tmp_path, capsys):
    pp = fold_dir(own_root) / "validation" / "postprocessing.json"
    data = json.loads(pp.read_text())
    data["postprocessing_fns"], data["postprocessing_kwargs"] = ["system"], [{}]
    pp.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert run_cli(predict_main, ["-i", str(one_case_folder(tmp_path / "in")), "-o", str(out), "-d", "4",
                                  "--device", "cpu"]) == 1
    assert "unknown postprocessing function 'system'" in one_line_error(capsys, "samnnu_predict")


def test_known_postprocessing_is_applied_from_json(own_root):
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest,
    )

    from samnnu.safe_io import load_postprocessing

    folder = fold_dir(own_root) / "validation"
    data = json.loads((folder / "postprocessing.json").read_text())
    data["postprocessing_fns"], data["postprocessing_kwargs"] = [keep_largest.__name__], [{"labels_or_regions": [1, [1, 2]]}]
    (folder / "postprocessing.json").write_text(json.dumps(data))
    fns, kwargs = load_postprocessing(folder)
    assert fns == [keep_largest] and kwargs == [{"labels_or_regions": [1, (1, 2)]}]
    seg = np.zeros((1, 8, 8), np.uint8)
    seg[0, :2, :2], seg[0, 5:, 5:] = 1, 1
    assert (fns[0](seg, **kwargs[0]) > 0).sum() == 9


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_continue_falls_back_to_the_newest_intact_checkpoint(own_root, capsys):
    from samnnu.pipeline.training import train

    fold = fold_dir(own_root)
    final, latest, best = (fold / f"checkpoint_{n}.pth" for n in ("final", "latest", "best"))
    data = final.read_bytes()
    final.write_bytes(data[: len(data) // 2])  # a save cut short by a full disk
    latest.write_bytes(b"")  # a save cut short by kill -9
    capsys.readouterr()
    train(4, 0, continue_training=True, run_chain=False, device="cpu", epochs=2)
    out = capsys.readouterr().out
    assert f"skipping {final}: damaged or truncated checkpoint" in out
    assert f"skipping {latest}: damaged or truncated checkpoint" in out
    assert f"resuming from {best} (epoch 1)" in out
    from samnnu.safe_io import load_torch_safely

    assert load_torch_safely(final)["current_epoch"] == 2  # trained on and saved a complete final checkpoint


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import torch

    from samnnu.safe_io import check_torch_archive, load_torch_safely, write_atomic

    target = tmp_path / "checkpoint_latest.pth"
    torch.save({"current_epoch": 3}, target)

    def dies_half_way(tmp: Path) -> None:
        torch.save({"current_epoch": 4, "w": torch.zeros(1000)}, tmp)
        tmp.write_bytes(tmp.read_bytes()[:500])
        raise OSError(28, "No space left on device")

    with pytest.raises(SamnnuError, match="checkpoint_latest.pth: cannot be written .no space left on device"):
        write_atomic(target, dies_half_way, check_torch_archive)
    assert load_torch_safely(target)["current_epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]


def _train_command(root: Path, *extra: str) -> list[str]:
    return [str(BIN / "samnnu_train"), "4", "0", "--no-chain", "--device", "cpu", "--data-root", str(root), *extra]


@pytest.mark.slow
def test_training_killed_during_a_checkpoint_save_resumes(own_root):
    from samnnu.safe_io import TMP_MARK, load_torch_safely

    fold = fold_dir(own_root)
    for f in fold.glob("checkpoint_*.pth"):
        f.unlink()
    proc = subprocess.Popen(_train_command(own_root, "--epochs", "200", "--iters-per-epoch", "1"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def saving_after_a_first_save() -> bool:  # a save in progress while an earlier one is complete
            names = [p.name for p in fold.iterdir()] if fold.is_dir() else []
            return any(n.startswith(TMP_MARK) and n.endswith(".pth") for n in names) and \
                any(n.startswith("checkpoint_") for n in names)

        caught = wait_for(saving_after_a_first_save, timeout=300, step=0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert caught, "no checkpoint save was seen in progress"
    finals = sorted(fold.glob("checkpoint_*.pth"))
    epochs = {p.name: load_torch_safely(p)["current_epoch"] for p in finals}  # every named checkpoint is intact
    assert epochs, "no checkpoint was completed before the kill"
    resumed = subprocess.run(_train_command(own_root, "--continue", "--epochs", str(max(epochs.values()) + 1)),
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "samnnu: resuming from" in resumed.stdout
    assert load_torch_safely(fold / "checkpoint_final.pth")["current_epoch"] == max(epochs.values()) + 1
    assert not list(fold.glob(TMP_MARK + "*")), "the killed save's temporary file was not cleaned up"


@pytest.mark.slow
def test_full_disk_during_training_is_one_line(own_root):
    results = own_root / "nnUNet_results"
    fold = results / DATASET / TINY_MODEL / "fold_0"
    cmd = " ".join(_train_command(own_root, "--epochs", "1", "--iters-per-epoch", "1"))
    done = small_filesystem_script(results, "6m", f"{cmd}\necho rc=$?\nls -a '{fold}'\n")
    assert "rc=1" in done.stdout, done.stdout + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("samnnu_train: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left on device" in errors[0].lower(), errors[0]
    listing = done.stdout.split("rc=1", 1)[1].split()
    assert not [n for n in listing if n.endswith(".pth")], listing  # no partial checkpoint under any name


# ----------------------------------------------------------------------------- outputs are checked


def test_image_write_that_leaves_an_empty_file_is_an_error(tmp_path, monkeypatch):
    from samnnu.safe_io import write_image_atomic

    image = sitk.GetImageFromArray(np.ones((4, 5, 6), np.uint8))
    target = tmp_path / "seg.nii.gz"
    # what SimpleITK does on a full disk: no exception, an empty (or short) file
    monkeypatch.setattr(sitk, "WriteImage", lambda img, path, *a, **k: Path(path).write_bytes(b""))
    with pytest.raises(SamnnuError, match="seg.nii.gz: cannot be written"):
        write_image_atomic(image, target)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_full_disk_during_prediction_is_an_error(own_root, tmp_path):
    inp = tmp_path / "in"
    for case in demo_cases()[-3:]:
        one_case_folder(inp, case).joinpath("case.nii.gz").rename(inp / f"{case}.nii.gz")
    out = tmp_path / "out"
    cmd = (f"{BIN / 'samnnu_predict'} -i '{inp}' -o '{out}' -d 4 --device cpu --disable-tta "
           f"--data-root '{own_root}'")
    done = small_filesystem_script(out, "12k", f"{cmd}\necho rc=$?\nls -a '{out}'\n")
    assert "rc=1" in done.stdout, done.stdout + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("samnnu_predict: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left on device" in errors[0] or "disk full" in errors[0], errors[0]
    assert "wrote" not in done.stdout
    listing = done.stdout.split("rc=1", 1)[1].split()
    assert not [n for n in listing if n.endswith(".nii.gz")], listing  # nothing under a final name


# ----------------------------------------------------------------------------- inputs are complete


def test_predict_refuses_a_truncated_input(own_root, tmp_path, capsys):
    inp = one_case_folder(tmp_path / "in")
    data = (inp / "case.nii.gz").read_bytes()
    (inp / "case.nii.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-d", "4", "--device", "cpu"]) == 1
    line = one_line_error(capsys, "samnnu_predict")
    assert "case.nii.gz: damaged or truncated gzip data" in line, line
    assert not out.exists()


def test_predict_refuses_a_truncated_uncompressed_input(own_root, tmp_path, capsys):
    inp = one_case_folder(tmp_path / "in")
    raw = gzip.decompress((inp / "case.nii.gz").read_bytes())
    (inp / "case.nii.gz").unlink()
    (inp / "case.nii").write_bytes(raw[: len(raw) - 100])
    out = tmp_path / "out"
    assert run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-d", "4", "--device", "cpu"]) == 1
    assert "no .nii.gz files to predict" in one_line_error(capsys, "samnnu_predict")  # a .nii.gz dataset
    from samnnu.safe_io import check_image_file

    with pytest.raises(SamnnuError, match=r"case.nii: truncated \(\d+ of \d+ bytes\)"):
        check_image_file(inp / "case.nii")


def test_predict_refuses_a_4d_input(own_root, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 6, 7, 8), np.float32), isVector=False),
                    str(inp / "case.nii.gz"))
    out = tmp_path / "out"
    assert run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-d", "4", "--device", "cpu"]) == 1
    line = one_line_error(capsys, "samnnu_predict")
    assert "case.nii.gz: is 4D (size (8, 7, 6, 2))" in line, line


@pytest.mark.slow
def test_predict_says_how_many_nan_voxels_it_reads_as_zero(own_root, tmp_path, capsys):
    inp = one_case_folder(tmp_path / "in")
    image = sitk.Cast(sitk.ReadImage(str(inp / "case.nii.gz")), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[0, :3, :4] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    sitk.WriteImage(nan_image, str(inp / "case.nii.gz"))
    out = tmp_path / "out"
    assert run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-d", "4", "--device", "cpu",
                                  "--disable-tta"]) == 0
    assert "case.nii.gz: 12 NaN voxel(s), predicted as if they were 0" in capsys.readouterr().err
    assert (out / "case.nii.gz").is_file()


def test_predict_output_that_is_a_file(own_root, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    assert run_cli(predict_main, ["-i", str(one_case_folder(tmp_path / "in")), "-o", str(out), "-d", "4",
                                  "--device", "cpu"]) == 1
    assert "is a file, not a folder" in one_line_error(capsys, "samnnu_predict")
    assert out.read_bytes() == b"keep me"


# ----------------------------------------------------------------------------- processes


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _predict_command(root: Path, inp: Path, out: Path) -> list[str]:
    return [str(BIN / "samnnu_predict"), "-i", str(inp), "-o", str(out), "-d", "4", "--device", "cpu",
            "--data-root", str(root)]


def _many_cases(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for case in demo_cases()[-n:]:
        shutil.copy2(demo_dataset_path() / "images" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
    return folder


FORK_RACE = """
import multiprocessing, os, signal, sys, time
# registered before samnnu's hooks, so in the child it runs first: a SIGTERM that arrives between the
# fork and the moment the child sets its own disposition (as multiprocessing.Pool.terminate can send one
# to a worker that is still starting on a loaded machine)
os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
from samnnu.processes import install_command_hooks
install_command_hooks()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
child.join(30)
alive = child.is_alive()
if alive:
    child.kill()
    child.join()
print(child.exitcode, alive)
"""


def test_sigterm_during_a_workers_start_still_ends_it():
    """A forked worker that gets SIGTERM before it has reset the command's handler still ends (it used to
    swallow the signal and run on, so nnU-Net's Pool waited for it forever)."""
    done = subprocess.run([sys.executable, "-c", FORK_RACE], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(-signal.SIGTERM), "False"], done.stdout + done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "predict"])
def test_workers_die_with_a_killed_command(own_root, tmp_path, command):
    env = {}
    if command == "train":
        cmd = _train_command(own_root, "--epochs", "500", "--iters-per-epoch", "2")
    else:
        cmd = _predict_command(own_root, _many_cases(tmp_path / "in", 8), tmp_path / "out")
        env["SAMNNU_NUM_THREADS"] = "3"  # with 2 cores or fewer samnnu_predict starts no workers at all
    proc = _start(cmd, **env)
    try:
        workers = wait_for(lambda: descendants(proc.pid), timeout=300, step=0.05)
        assert workers, "the command started no worker processes"
        time.sleep(1.0)  # let every worker get going
        workers = descendants(proc.pid)
        proc.kill()  # kill -9 of the command alone, as an out-of-memory kill does
        proc.wait()
        left = wait_for(lambda: not alive(workers), timeout=15, step=0.1)
        assert left, f"workers outlived their command: {sorted(alive(workers))}"
    finally:
        for pid in alive(descendants(proc.pid)):
            os.kill(pid, signal.SIGKILL)
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_terminated_prediction_cleans_up_and_resumes(own_root, tmp_path):
    from samnnu.pipeline.prediction import WORK_FOLDER

    inp, out = _many_cases(tmp_path / "in", 8), tmp_path / "out"
    proc = _start(_predict_command(own_root, inp, out))
    def complete_raw_predictions():  # a file caught while nnU-Net still writes it is not one
        return [p for p in (out / WORK_FOLDER).glob("*.nii.gz") if _intact_output(p)] if (out / WORK_FOLDER).is_dir() else []

    raw = wait_for(complete_raw_predictions, timeout=300, step=0.01)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert raw, "no raw prediction appeared before the run ended"
    assert proc.returncode == 143, err[-2000:]
    assert "samnnu_predict: terminated" in err and "Traceback" not in err, err[-2000:]
    assert wait_for(lambda: not alive(workers), timeout=15, step=0.1), "workers outlived the terminated command"
    assert not list(out.glob(".samnnu-tmp-*")) and not list(out.glob(".samnnu_tmp_*"))

    again = subprocess.run(_predict_command(own_root, inp, out), env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    said = [line for line in again.stderr.splitlines() if line.startswith("samnnu")]
    assert "reusing" in again.stderr and "raw predictions of the interrupted run" in again.stderr, said
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inp.iterdir())  # nothing else left

    fresh = tmp_path / "fresh"
    assert subprocess.run(_predict_command(own_root, inp, fresh), env=ENV, capture_output=True).returncode == 0
    for p in inp.iterdir():
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / p.name))) for d in (out, fresh))
        assert np.array_equal(a, b), p.name


@pytest.mark.slow
def test_finished_cases_of_an_interrupted_run_are_kept(own_root, tmp_path, capsys, monkeypatch):
    from samnnu.pipeline import prediction

    inp, out = _many_cases(tmp_path / "in", 3), tmp_path / "out"
    calls = []
    original = prediction._run_model

    def count(model, cases, work, probabilities):
        calls.append(sorted(cases))
        return original(model, cases, work, probabilities)

    monkeypatch.setattr(prediction, "_run_model", count)
    real_replace, moved = os.replace, []

    def interrupt_after_two(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".nii.gz") and Path(dst).parent == out:
            moved.append(dst)
            if len(moved) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(prediction.os, "replace", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        prediction.predict(inp, out, 4, device="cpu", mirroring=False)
    monkeypatch.setattr(prediction.os, "replace", real_replace)
    capsys.readouterr()
    written = prediction.predict(inp, out, 4, device="cpu", mirroring=False)
    # the first case was moved and recorded; the second was moved when the interruption came, before it
    # was recorded, so it is predicted again with the third
    assert "1 of 3 cases were already predicted" in capsys.readouterr().err
    assert len(calls[1]) == 2 and Path(moved[0]).name[:-7] not in calls[1]
    assert sorted(p.name for p in written) == sorted(p.name for p in inp.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inp.iterdir())


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv,expected", [
    (["4", "0", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["4", "0", "--epochs", "-1"], "argument --epochs: must be at least 1, got -1"),
    (["4", "0", "--iters-per-epoch", "0"], "argument --iters-per-epoch: must be at least 1, got 0"),
    (["4", "0", "--epochs", "two"], "argument --epochs: 'two' is not a whole number"),
    (["4", "abc"], "fold 'abc' is neither a number"),
    (["4", "-1"], "fold '-1' is neither a number"),
], ids=["epochs-0", "epochs-negative", "iters-0", "epochs-word", "fold-word", "fold-negative"])
def test_train_argument_errors(data_root, capsys, argv, expected):
    assert run_cli(train_main, argv + ["--device", "cpu"]) == 2
    line = one_line_error(capsys, "samnnu_train")
    assert expected in line, line


def test_fold_outside_the_splits_is_refused(data_root, capsys):
    assert run_cli(train_main, ["4", "7", "--device", "cpu", "--epochs", "1"]) == 1
    line = one_line_error(capsys, "samnnu_train")
    assert "fold 7 does not exist: the dataset's splits_final.json has folds 0-4" in line, line


def test_budget_checked_by_the_api(data_root):
    from samnnu.pipeline.training import train

    for bad in (dict(epochs=0), dict(iters_per_epoch=-3)):
        with pytest.raises(SamnnuError, match="must be a whole number of at least 1"):
            train(4, 0, device="cpu", **bad)


def test_unknown_trainer_is_named_before_its_plans(data_root, capsys):
    assert run_cli(train_main, ["4", "0", "-tr", "NoSuchTrainer", "--device", "cpu"]) == 1
    line = one_line_error(capsys, "samnnu_train")
    assert "unknown trainer 'NoSuchTrainer'" in line and "nnUNetPlans" not in line, line


@pytest.mark.slow
def test_small_dataset_gets_fewer_folds(tmp_path, monkeypatch, capsys):
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus
    from samnnu.pipeline.planning import plan_and_preprocess
    from samnnu.pipeline.training import train

    paths = use_data_root(monkeypatch, tmp_path / "root")
    src = copy_demo_cases(tmp_path / "src", demo_cases()[:3])
    convert_hippocampus(src, 4, raw_root=paths.raw)
    plan_and_preprocess(4, encoder="tiny", configurations=("2d",), device_type="cpu", device_memory_gb=8)
    assert "3 cases: 3-fold cross-validation instead of 5 (folds 0-2)" in capsys.readouterr().out
    splits = json.loads((paths.preprocessed / DATASET / "splits_final.json").read_text())
    assert [len(s["val"]) for s in splits] == [1, 1, 1]
    result = train(4, 2, epochs=1, iters_per_epoch=1, device="cpu", mirroring=False, run_chain=False)
    assert Path(result["fold_dir"], "checkpoint_final.pth").is_file()
    assert run_cli(train_main, ["4", "3", "--device", "cpu"]) == 1
    assert "folds 0-2" in one_line_error(capsys, "samnnu_train")


def test_nested_weights_only_blocks_keep_the_guard_until_the_outer_one_ends():
    """A trainer's load_checkpoint guards nnU-Net's torch.load itself, inside samnnu's guarded resume."""
    import torch

    from samnnu.safe_io import weights_only_loading

    real = torch.load
    with weights_only_loading():
        guarded = torch.load
        assert guarded is not real
        with weights_only_loading():
            assert torch.load is not real
        assert torch.load is guarded
    assert torch.load is real

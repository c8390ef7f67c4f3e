"""Files that are safe to read and never half-written: the one home for samnnu's I/O rules.

- **Atomic, checked writes.** Everything samnnu writes goes to a hidden temporary file in the target's
  folder, is flushed to disk and checked (size, and for images a re-read), then renamed into place.
  A full disk or a crash leaves the previous file (or none) under the final name, never a partial one.
  SimpleITK's ``WriteImage`` does not report a full disk; the re-read does.
- **Model files never run code.** Checkpoints are read with ``torch.load(weights_only=True)``; only
  tensors, plain containers and numpy scalars are accepted. nnU-Net's own ``torch.load`` calls go
  through the same loader inside :func:`weights_only_loading`. Pickles (``postprocessing.pkl``) are
  never read: nnU-Net's ``postprocessing.json`` is, with function names looked up in an allow-list.
- **Complete inputs.** :func:`check_image_file` refuses a truncated or damaged image (SimpleITK reads
  the missing part of a cut-off ``.nii.gz`` as zeros) with a one-line message naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import json
import math
import os
import pickle
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from samnnu.errors import SamnnuError

try:
    from numpy._core.multiarray import scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar

TMP_MARK = ".samnnu-tmp-"


def _first_line(text: str) -> str:
    """The gist of a library's error message: its last non-empty line, up to the first sentence's end."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    return line.split(". ", 1)[0].rstrip(".")


def describe_os_error(err: OSError) -> str:
    """A short, lower-case account of an OSError: 'no space left on device', 'permission denied', ..."""
    if err.errno == errno.ENOSPC:
        return "no space left on device"
    if err.errno == errno.EDQUOT:
        return "disk quota exceeded"
    text = err.strerror or _first_line(str(err))
    return text[:1].lower() + text[1:]


def _default_mode() -> int:
    """Permissions a newly created file gets (0o666 less the umask); mkstemp's own 0o600 is for secrets."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def reported_os_errors(where: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block (full disk, no permission, ...) into a one-line
    :class:`SamnnuError` naming the file the error names, else ``where``."""
    try:
        yield
    except OSError as err:
        raise SamnnuError(f"{err.filename or where}: {describe_os_error(err)}") from None


def tmp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path`` that keeps its file ending (writers choose the format
    from it): ``dir/.samnnu-tmp-<pid>-<random>-<name>``."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_MARK}{os.getpid()}-", suffix="-" + path.name, dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
    finally:
        os.close(fd)
    return Path(tmp)


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete temporary files that a killed samnnu process left in ``folder`` (their writer is gone);
    returns how many. Files of running processes are kept."""
    removed = 0
    pattern = re.compile(re.escape(TMP_MARK) + r"(\d+)-")
    for entry in Path(folder).glob(TMP_MARK + "*"):
        m = pattern.match(entry.name)
        if not m or _alive(int(m[1])):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_system_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        _fsync(folder)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None],
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write a file through ``write(tmp_path)``, check it, then rename it to ``path``.

    Args:
        path: final file name; its folder is created.
        write: writes the complete file to the path it is given.
        check: raises (any exception) when the written file is not what it should be; an empty file
            is always refused.
    Raises:
        SamnnuError: one line naming ``path`` when writing or the check fails (disk full, ...);
            nothing is left under ``path`` or beside it, and a previous file there is kept.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(path)
    except OSError as e:
        raise SamnnuError(f"{path}: cannot be written ({describe_os_error(e)})") from None
    try:
        write(tmp)
        _fsync(tmp)
        if tmp.stat().st_size == 0:
            raise SamnnuError("the written file is empty (disk full?)")
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise SamnnuError(f"{path}: cannot be written ({describe_os_error(e)})") from None
        if not isinstance(e, Exception):  # Ctrl-C, SIGTERM, exit
            raise
        if _file_system_full(path.parent):  # writers such as torch.save report ENOSPC in their own words
            raise SamnnuError(f"{path}: cannot be written (no space left on device)") from None
        reason = str(e) if isinstance(e, SamnnuError) else _first_line(str(e))
        raise SamnnuError(f"{path}: cannot be written ({reason})") from None
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically; the file's size is checked before it takes the final name."""
    data = text.encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    def check(tmp: Path) -> None:
        if tmp.stat().st_size != len(data):
            raise SamnnuError(f"short write ({tmp.stat().st_size} of {len(data)} bytes; disk full?)")

    if not data:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
        return Path(path)
    return write_atomic(path, write, check)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically (NaN and infinities are refused: convert them first, e.g. with
    :func:`to_jsonable`)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays converted, NaN and infinities become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, np.ndarray)):
        return [to_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


_REQUIRED = object()


def read_json(path: str | os.PathLike, what: str = "JSON file", *, default: Any = _REQUIRED) -> Any:
    """The parsed JSON file ``path``; ``what`` names it in the one-line error.

    Args:
        default: returned instead of an error when the file is missing or unreadable (for files that
            are optional, such as a previous run's record).
    Raises:
        SamnnuError: ``PATH: WHAT is missing`` or ``PATH: cannot read WHAT (reason)`` (no ``default``).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if default is not _REQUIRED:
            return default
        raise SamnnuError(f"{path}: {what} is missing") from None
    except (OSError, ValueError) as e:
        if default is not _REQUIRED:
            return default
        reason = describe_os_error(e) if isinstance(e, OSError) else str(e)
        raise SamnnuError(f"{path}: cannot read {what} ({reason})") from None


# --------------------------------------------------------------------------- checkpoints


def _torch_safe_globals() -> list:
    """The non-tensor types nnU-Net's checkpoints hold: numpy scalars in the training log."""
    dtype_classes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32",
                                                   "int16", "int8", "uint8", "bool")]
    return [scalar, np.dtype, *dtype_classes]


def load_torch_safely(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never runs code from the file.

    Raises:
        SamnnuError: naming the file, when it holds anything but tensors, plain containers and numpy
            scalars (e.g. a pickle payload), or when it is truncated or damaged.
    """
    import torch  # local: torch takes seconds to import

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return _original_torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights only" in text.lower() or "unsupported global" in text.lower():
            found = re.search(r"GLOBAL ([\w.]+)|(?:error: |\t)([\w.]+) whose module", text)
            what = next((g for g in found.groups() if g), None) if found else None
            what = f" ({what})" if what else ""
            raise SamnnuError(f"{path}: refused: it holds an object{what} that loading would have to run as "
                              f"code; samnnu loads tensors and plain data only (model files never run code)") \
                from None
        raise SamnnuError(f"{path}: damaged checkpoint ({_first_line(str(e))})") from None
    except FileNotFoundError:
        raise SamnnuError(f"{path}: checkpoint missing") from None
    except OSError as e:
        raise SamnnuError(f"{path}: cannot read the checkpoint ({describe_os_error(e)})") from None
    except (EOFError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SamnnuError(f"{path}: damaged or truncated checkpoint ({_first_line(str(e)) or type(e).__name__})") \
            from None


def check_torch_archive(path: str | os.PathLike) -> None:
    """Raise unless ``path`` is a complete ``torch.save`` archive (a zip whose directory, written last,
    is intact and lists the pickled object)."""
    with zipfile.ZipFile(path) as z:
        if "data.pkl" not in {n.rsplit("/", 1)[-1] for n in z.namelist()}:
            raise SamnnuError("incomplete checkpoint archive")


def _original_torch_load(*args, **kwargs):
    """torch.load itself, also while :func:`weights_only_loading` has replaced it."""
    import torch  # local: torch takes seconds to import

    return getattr(torch.load, "samnnu_original", torch.load)(*args, **kwargs)


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Within the block, every ``torch.load`` (nnU-Net's included) goes through :func:`load_torch_safely`.

    nnU-Net's predictor and ``nnUNetTrainer.load_checkpoint`` call ``torch.load(..., weights_only=False)``
    on the model's checkpoints; this is how samnnu keeps them from running code while still using
    nnU-Net's own loading logic.
    """
    import torch  # local: torch takes seconds to import

    previous = torch.load  # restored on exit: the guard stays on when blocks are nested
    original = getattr(previous, "samnnu_original", previous)

    def guarded(f, map_location=None, **_ignored):
        return load_torch_safely(f, map_location=map_location if map_location is not None else "cpu")

    guarded.samnnu_original = original
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = previous


# --------------------------------------------------------------------------- postprocessing


def load_postprocessing(folder: str | os.PathLike) -> tuple[list, list] | None:
    """nnU-Net's postprocessing decision from ``folder/postprocessing.json``, or None when there is none.

    The functions are looked up by name in an allow-list of nnU-Net's postprocessing functions; the
    ``postprocessing.pkl`` beside it is never read (unpickling can run code).

    Returns:
        (functions, keyword arguments), as nnU-Net's ``apply_postprocessing`` takes them.
    """
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    allowed = {f.__name__: f for f in (remove_all_but_largest_component_from_segmentation,)}
    path = Path(folder) / "postprocessing.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        names, kwargs = data["postprocessing_fns"], data["postprocessing_kwargs"]
        if not isinstance(names, list) or not isinstance(kwargs, list) or len(names) != len(kwargs):
            raise ValueError("postprocessing_fns and postprocessing_kwargs must be lists of equal length")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SamnnuError(f"{path}: not a valid postprocessing file ({_first_line(str(e))})") from None
    fns, fixed = [], []
    for name, kw in zip(names, kwargs):
        if name not in allowed:
            raise SamnnuError(f"{path}: unknown postprocessing function '{name}' (known: {', '.join(allowed)})")
        if not isinstance(kw, dict) or set(kw) - {"labels_or_regions", "background_label"}:
            raise SamnnuError(f"{path}: unexpected arguments for {name}: {kw}")
        kw = dict(kw)
        lor = kw.get("labels_or_regions")
        if isinstance(lor, list):  # JSON turned region tuples into lists
            kw["labels_or_regions"] = [tuple(x) if isinstance(x, list) else x for x in lor]
        fns.append(allowed[name])
        fixed.append(kw)
    return fns, fixed


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says: dimension (2, 3 or 4), size (x, y[, z[, t]]), components per
    voxel (3 for RGB), and whether the pixel type is floating point (can hold NaN)."""

    dimension: int
    size: tuple[int, ...]
    components: int
    floating: bool = False


def _nifti_expected_bytes(path: Path) -> int | None:
    import nibabel  # local: nibabel is slow to import

    try:
        proxy = nibabel.load(str(path)).dataobj
    except Exception as e:  # nibabel raises many types for bad headers
        raise SamnnuError(f"{path}: not a readable image ({_first_line(str(e))})") from None
    return int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize


def _gzip_length(path: Path) -> int:
    try:
        with gzip.open(path, "rb") as stream:
            return sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 20), b""))
    except (EOFError, OSError, zlib.error) as e:
        raise SamnnuError(f"{path}: damaged or truncated gzip data ({_first_line(str(e))})") from None


def check_image_file(path: str | os.PathLike) -> ImageInfo:
    """Refuse an image file that is missing, unreadable, truncated or damaged; return its header facts.

    ``.gz`` files must be one complete gzip stream (CRC included); NIfTI files must hold header + all
    voxels. Other formats are checked by SimpleITK reading their header.

    Raises:
        SamnnuError: one line naming the file and the problem.
    """
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    path = Path(path)
    if not path.is_file():
        raise SamnnuError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise SamnnuError(f"{path}: empty file")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        expected = _nifti_expected_bytes(path)
        size = _gzip_length(path) if name.endswith(".gz") else path.stat().st_size
        if expected is not None and size < expected:
            raise SamnnuError(f"{path}: truncated ({size} of {expected} bytes)")
    elif name.endswith(".gz"):
        _gzip_length(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise SamnnuError(f"{path}: not a readable image ({_first_line(str(e))})") from None
    floating = "float" in sitk.GetPixelIDValueAsString(reader.GetPixelID()).lower()
    return ImageInfo(reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents(), floating)


def write_image_atomic(image, path: str | os.PathLike, compress: bool = True) -> Path:
    """``sitk.WriteImage`` through a temporary file, re-checked with :func:`check_image_file`."""
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    return write_atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=compress),
                        check_image_file)

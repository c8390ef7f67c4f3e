"""Rows computed once and kept on disk: float16 memory-mapped ``.npy`` arrays filled a chunk at a time,
resumable after an interruption.

Used for what is expensive to recompute and cheap to store: a teacher's image embeddings
(:mod:`samnnu.pipeline.distill`) and the refiner's slice embeddings (:mod:`samnnu.interactive.prompt_training`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from tqdm import tqdm

from samnnu.safe_io import write_json_atomic


def cached_rows(arrays: Mapping[str, tuple[Path, tuple[int, ...]]], meta_file: Path, key: dict, n: int,
                compute: Callable[[range], Mapping[str, np.ndarray]], *, chunk: int = 32, desc: str = "caching",
                progress: bool = True) -> dict[str, np.ndarray]:
    """Fill ``n`` rows of each array in ``arrays`` ({name: (file, row shape)}) with ``compute(rows)``.

    ``compute`` gets a range of row indices and returns {name: (len(rows), *row shape) array}. Progress is
    recorded in ``meta_file`` after every chunk, together with ``key`` (what the rows are computed from):
    a later call with the same key continues where the last one stopped, another key starts afresh.
    Returns {name: read-only (n, *row shape) float16 memory map}.
    """
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    fresh = meta is None or meta.get("key") != key or not all(f.is_file() for f, _ in arrays.values())
    if fresh:
        maps = {name: np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(n, *shape))
                for name, (f, shape) in arrays.items()}
        meta = {"key": key, "done": 0}
        write_json_atomic(meta_file, meta)
    else:
        maps = {name: np.load(f, mmap_mode="r+") for name, (f, _) in arrays.items()}
    done = int(meta["done"])
    bar = tqdm(total=n, initial=done, desc=desc, unit="row", dynamic_ncols=True, disable=not progress)
    while done < n:
        rows = range(done, min(done + chunk, n))
        values = compute(rows)
        for name, arr in maps.items():
            arr[rows.start:rows.stop] = np.asarray(values[name], dtype=np.float16)
            arr.flush()
        done = rows.stop
        write_json_atomic(meta_file, dict(meta, done=done))
        bar.update(len(rows))
    bar.close()
    return {name: np.load(f, mmap_mode="r") for name, (f, _) in arrays.items()}

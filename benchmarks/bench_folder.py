"""Command-line set-up shared by the scripts that read a finished ``samnnu_benchmark`` folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def open_benchmark(description: str, argv=None) -> tuple:
    """Parse ``--data-root DATA -b BENCH -o OUT``, point samnnu at DATA and create OUT.

    Returns:
        (the data root's paths, BENCH, OUT, BENCH's ``results.json`` as a dict).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-root", required=True)
    p.add_argument("-b", "--bench", required=True, help="the samnnu_benchmark output folder")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)

    from samnnu.config import setup_environment

    paths = setup_environment(args.data_root, quiet=True)
    bench, out = Path(args.bench).resolve(), Path(args.output).resolve()
    state = json.loads((bench / "results.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    return paths, bench, out, state

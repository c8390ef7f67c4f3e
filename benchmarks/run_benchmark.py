"""samnnu trainers vs plain nnU-Net on one fold (same as the ``samnnu_benchmark`` command).

Full run recorded in docs/benchmarks.md (hippocampus, fold 0, label efficiency):

    python benchmarks/run_benchmark.py -d 4 --data-root DATA --iterations N --sizes 5 10 20 all -o OUT
"""
import sys

from samnnu.cli import benchmark_main

if __name__ == "__main__":
    sys.exit(benchmark_main())

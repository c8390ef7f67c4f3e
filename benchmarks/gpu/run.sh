#!/usr/bin/env bash
# The GPU run in the commands the GPU machine allows (docs/gpu.md). From the repository root:
#
#   bash benchmarks/gpu/run.sh install     # install the carried wheels (.whl/*/) and samnnu into .site/
#   bash benchmarks/gpu/run.sh run [ARGS]  # benchmarks/gpu/run.py ARGS with .site/ on the path
#
# "install" may run in several commands, each sent with one group of wheels: .site/ (ignored by git)
# stays on the machine between commands while it stays up.
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE="$PWD/.site"
case "${1:-}" in
  install)
    shopt -s nullglob
    wheels=(.whl/*/*.whl)
    if ((${#wheels[@]})); then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    fi
    if [ -d "$SITE/nnunetv2" ] && [ ! -d "$SITE/samnnu" ]; then  # samnnu itself, once nnU-Net is there
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" .
    fi
    echo "installed: $(ls "$SITE" | grep -c dist-info) packages in $SITE"
    ;;
  run)
    shift
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    exec python3 benchmarks/gpu/run.py "$@"
    ;;
  *)
    echo "usage: bash benchmarks/gpu/run.sh install | run [benchmarks/gpu/run.py options]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The GPU benchmark in one command (bench.py's gpu section; under 5 minutes on one H100/H200-class GPU):
#
#   bash bench_gpu.sh [bench.py flags]     # results: $OUT/gpu.json and $OUT/gpu.log (./ when OUT is unset)
#   bash bench_gpu.sh wheels               # where pip reaches its registry: fill .whl/ for an offline GPU machine
#
# Which Python: $PYTHON if set; else python3 when its torch sees a GPU (an image that ships CUDA torch is used as
# it is, whatever its torch version); else, on a machine with a GPU, the venv .venv-gpu with requirements.txt and
# requirements-bench.txt (on Linux pip resolves torch to its CUDA wheels). What that Python still lacks (on such
# an image: tyro and its dependencies) goes into .bench-site/, from the wheels in .whl/ if there are any (no
# network needed), else from the registry. Run again, nothing is reinstalled. Without a GPU, bench.py says so in
# one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = wheels ]; then  # pure-Python wheels (any platform); the versions this project was tested with
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0
    ls .whl
    exit
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    if [ -n "${PYTHON:-}" ] || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "bench_gpu.sh: no GPU ($PY's torch sees none, nvidia-smi lists none): nothing measured"
        exit 0
    fi
    [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    "$PY" -m pip install -q -r requirements.txt -r requirements-bench.txt
fi

export PYTHONPATH="$PWD/.bench-site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
missing=$("$PY" -c '
import importlib.util as u
need = {"tyro": "tyro", "docstring_parser": "docstring-parser", "typeguard": "typeguard", "yaml": "pyyaml",
        "tqdm": "tqdm", "numpy": "numpy", "transformers": "transformers", "tokenizers": "tokenizers"}
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    echo "bench_gpu.sh: installing into .bench-site: $missing"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .bench-site .whl/*.whl
    else
        "$PY" -m pip install -q --target .bench-site $missing \
            || { echo "bench_gpu.sh: offline? 'bash bench_gpu.sh wheels' where pip works, bring .whl/" >&2; exit 1; }
    fi
fi

out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.log" || true
# The loader workers' batches (54 MB each) cross through /dev/shm.
df -h /dev/shm 2>&1 | tail -1 | tee -a "$out/gpu.log" || true
"$PY" bench.py --only gpu --json "$out/gpu.json" "$@" 2>&1 | tee -a "$out/gpu.log"

#!/usr/bin/env bash
# The GPU benchmark as one unattended command (bench.py's gpu sections; under 10 minutes on one H100/H200-class GPU):
#
#   bash bench_gpu.sh [SECTION...] [bench.py flags]  # SECTION: gpt2 eval qwen2 pixels vlm (default: all, in order)
#   bash bench_gpu.sh wheels                          # where pip reaches its registry: fill .whl/ for an offline GPU
#   bash bench_gpu.sh pixels --smoke                  # any machine: the code paths at tiny sizes (on the CPU if no GPU)
#
# Sections: gpt2 (GPT-2 124M dialogue at batch 16, 64, 128, eager and --compile, against a bare loop, with
# --profile), eval (beam search against a bare generate), qwen2 (a Qwen2-0.5B-shaped LM three ways, with --profile),
# pixels (ViT-B/16 on JPEGs and on videos), vlm (a LLaVA-shaped VLM captioning, eager, against a bare loop). Each runs
# as its own bench.py process under a time limit in seconds (LIMIT_GPT2=210 LIMIT_EVAL=40 LIMIT_QWEN2=180
# LIMIT_PIXELS=90 LIMIT_VLM=55; all together at most LIMIT_ALL=560): a section that fails or runs out of time is
# reported and the next one still runs (exit status 1 if any did). Results in $OUT
# (./ when unset): gpu-SECTION.json, rewritten after every measurement, so a section stopped midway keeps what it
# measured; profile-gpu*.txt; and all that was printed, in gpu.log.
#
# Which Python: $PYTHON if set; else python3 when its torch sees a GPU (an image that ships CUDA torch is used as
# it is, whatever its torch version); else, on a machine with a GPU, the venv .venv-gpu with requirements.txt and
# requirements-bench.txt (on Linux pip resolves torch to its CUDA wheels). What that Python still lacks (on such
# an image: tyro and its dependencies, PyAV, pytest: bench.py builds its models with tests/) goes into
# .bench-site/, from the wheels in .whl/ if there are any (no network needed), else from the registry. Run again,
# nothing is reinstalled. Without a GPU (and without --smoke) it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = wheels ]; then  # the versions this project was tested with; PyAV's wheel: CPython >= 3.11, x86-64
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0 \
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0
    ls .whl
    exit
fi

sections=()
while [ $# -gt 0 ] && [[ " gpt2 eval qwen2 pixels vlm " == *" $1 "* ]]; do sections+=("$1"); shift; done
[ ${#sections[@]} -gt 0 ] || sections=(gpt2 eval qwen2 pixels vlm)
smoke=$([[ " $* " == *" --smoke "* ]] && echo 1 || true)

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null && [ -z "$smoke" ]; then
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
        "tqdm": "tqdm", "numpy": "numpy", "transformers": "transformers", "tokenizers": "tokenizers", "av": "av",
        "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments"}  # tests/ builds models
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    echo "bench_gpu.sh: installing into .bench-site: $missing"
    install=("$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .bench-site)
    if compgen -G ".whl/*-none-any.whl" >/dev/null; then
        "${install[@]}" .whl/*-none-any.whl
        for wheel in .whl/*.whl; do  # a binary wheel built for another Python is skipped: its section says so
            [[ $wheel == *-none-any.whl ]] || "${install[@]}" "$wheel" || echo "bench_gpu.sh: $wheel not installed"
        done
    else
        "$PY" -m pip install -q --target .bench-site $missing \
            || { echo "bench_gpu.sh: offline? 'bash bench_gpu.sh wheels' where pip works, bring .whl/" >&2; exit 1; }
    fi
fi

out=${OUT:-.}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.log" || true
# The loader workers' batches (54 MB each) cross through /dev/shm.
df -h /dev/shm 2>&1 | tail -1 | tee -a "$out/gpu.log" || true
declare -A only=([gpt2]="gpu --profile" [eval]=gpu-eval [qwen2]="gpu-qwen2 --profile" [pixels]=gpu-pixels)
only[vlm]=gpu-vlm
declare -A limit=([gpt2]=${LIMIT_GPT2:-210} [eval]=${LIMIT_EVAL:-40} [qwen2]=${LIMIT_QWEN2:-180})
limit[pixels]=${LIMIT_PIXELS:-90} limit[vlm]=${LIMIT_VLM:-55}
status=0
for section in "${sections[@]}"; do
    left=$((${LIMIT_ALL:-560} - SECONDS))
    seconds=$((limit[$section] < left ? limit[$section] : left))
    if [ "$seconds" -le 10 ]; then
        echo "bench_gpu.sh: $section not run: LIMIT_ALL spent" | tee -a "$out/gpu.log"
        status=1
        continue
    fi
    echo "bench_gpu.sh: $section (at most $seconds s)" | tee -a "$out/gpu.log"
    # SIGINT at the limit: bench.py marks the section stopped in its JSON and prints what it measured.
    set +e
    # shellcheck disable=SC2086
    timeout -s INT -k 15 "$seconds" "$PY" bench.py --only ${only[$section]} --json "$out/gpu-$section.json" "$@" \
        2>&1 | tee -a "$out/gpu.log"
    code=${PIPESTATUS[0]}
    set -e
    if [ "$code" -ne 0 ]; then
        echo "bench_gpu.sh: $section exited $code (124/130: out of time): what it measured is in $out/gpu-$section.json" \
            | tee -a "$out/gpu.log"
        status=1
    fi
done
exit $status

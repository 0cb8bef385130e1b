#!/usr/bin/env bash
# Creates the PyTorch/transformers reference environment at <repo>/.venv (git-ignored).
#
# Used only to (re)generate the committed test fixtures under tests/fixtures/ and to run
# the PyTorch benchmark twin (scripts/bench/torch_twin.py). The Rust build and tests never
# need it.
#
# Why not plain `pip install torch`: on Linux x86_64 every torch wheel on PyPI is a CUDA
# build and pulls ~3 GB of nvidia-* / triton / cuda-* wheels. There is no CPU-only torch
# wheel on PyPI for x86_64 (the CPU wheels live on download.pytorch.org, which is not
# reachable here). `pip install --no-deps torch` alone does NOT work: libtorch_cpu.so itself
# has DT_NEEDED entries for libcudart.so.13 and libcupti.so.13, libtorch.so needs
# libtorch_cuda.so (-> cublas, cudnn, nccl, nvshmem, cusparseLt, cufft, cufile, nvrtc, ...),
# and torch/__init__.py's _preload_cuda_deps() insists on cusolver and nvJitLink too, so
# `import torch` fails with "libcublasLt.so.*[0-9] not found" (verified with 2.15.0).
#
# Leanest install that works from PyPI only (what this script does):
#   torch --no-deps  +  exactly the 13 nvidia library wheels torch dlopens at import time
#   (--no-deps)  +  torch's pure-python deps.
# Skipped from torch's declared requirements: triton (torch.compile/GPU kernels only),
# cuda-bindings, cuda-pathfinder, cuda-toolkit (metapackage), nvidia-cuda-cccl (headers),
# nvidia-nvtx (optional). CPU tensor ops, autograd, SDPA and AdamW all work.
# `pip check` will list the skipped ones as missing: that is expected.
#
# Set FULL=1 to do the plain, unpruned `pip install torch==$TORCH_VERSION` instead.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.15.0
# Exact versions torch 2.15.0's metadata resolves to (cuda-toolkit 13.2.2 extras etc.).
NVIDIA_LIBS=(
  nvidia-cuda-runtime==13.2.86
  nvidia-cuda-cupti==13.2.86
  nvidia-cuda-nvrtc==13.2.86
  nvidia-cublas==13.4.1.3
  nvidia-cudnn-cu13==9.26.0.51
  nvidia-cufft==12.2.0.57
  nvidia-cufile==1.17.1.22
  nvidia-cusolver==12.2.0.11
  nvidia-cusparse==12.7.10.12
  nvidia-cusparselt-cu13==0.8.1
  nvidia-nccl-cu13==2.30.7
  nvidia-nvshmem-cu13==3.7.2
  nvidia-nvjitlink==13.5.37
)
TORCH_PY_DEPS=(
  filelock==4.3.1
  typing-extensions==4.16.0
  "setuptools==84.2.1"
  sympy==1.14.0
  mpmath==1.3.0
  networkx==3.6.1
  jinja2==3.1.6
  markupsafe==3.0.4
  fsspec==2026.9.0
)
REFERENCE_PKGS=(
  transformers==5.24.0
  tokenizers==0.23.3
  safetensors==0.8.0
  numpy==2.4.6
  gguf==0.19.0
)

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ "${FULL:-0}" = "1" ]; then
  "${PIP[@]}" install "torch==$TORCH_VERSION"
else
  "${PIP[@]}" install --no-deps "torch==$TORCH_VERSION" "${NVIDIA_LIBS[@]}"
fi
"${PIP[@]}" install "${REFERENCE_PKGS[@]}" "${TORCH_PY_DEPS[@]}"

# Verify: torch imports and runs CPU ops (incl. autograd and SDPA); transformers renders a
# chat template through a locally built fast tokenizer (no hub access).
"$VENV/bin/python" - <<'EOF'
import torch, torch.nn.functional as F
import transformers, tokenizers, numpy
torch.manual_seed(0)
x = torch.randn(4, 8, requires_grad=True)
w = torch.randn(8, 8, dtype=torch.float64)
(x @ x.T).sum().backward()
q = torch.randn(1, 2, 5, 4)
o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
assert x.grad is not None and o.shape == q.shape and torch.isfinite(o).all()
assert (w @ w.T).dtype == torch.float64
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                              unk_token="<unk>", eos_token="<unk>")
tok.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user:hi\n"
print(f"ok: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
      f"numpy {numpy.__version__}, threads {torch.get_num_threads()}")
EOF
echo "venv ready at $VENV in $(( $(date +%s) - start ))s"

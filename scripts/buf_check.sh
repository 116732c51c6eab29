#!/usr/bin/env bash
# buf lint (STANDARD) on the API, and buf breaking against the API baseline: the commit where
# tokenrelay.v1 took its current service names. A breaking change fails here; a new API version
# goes in a new package (tokenrelay.v2) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
BASELINE=${TOKENRELAY_API_BASELINE:-c367b7e107157ca3088c090a1d45e58ec179bb01}
(cd protos && buf lint)
if git cat-file -e "$BASELINE^{commit}" 2>/dev/null; then
  buf breaking protos --against ".git#ref=$BASELINE,subdir=protos"
else
  echo "buf breaking: baseline $BASELINE not in this clone's history" >&2
  exit 1
fi

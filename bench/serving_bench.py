"""Serving benchmark: drive a running tokenrelay server with the load generator.

A thin wrapper around `tokenrelay.loadgen` (the same as `tokenrelay bench`), with defaults for
a serving sweep. Start a server first, e.g. the synthetic engine for serving overhead:

    python -m tokenrelay_server.cli serve --engine synthetic --port 50051 &
    python bench/serving_bench.py --target localhost:50051 --concurrency 1,4,16,64 \
        --num-requests 200 --input-len 128 --output-len 128 --json-out bench/results/serving.json

or an open-loop sweep: `--rate 2,8,32 --duration 30`. Results print as tables on stdout;
`--json-out` keeps every number (and every request) for later comparison.
"""

from __future__ import annotations

import sys

from tokenrelay.loadgen import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

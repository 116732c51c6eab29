"""Regenerate the Python stubs in client/tokenrelay/v1 from protos/ (the one command).

    python scripts/gen_protos.py          # write the stubs
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs differ (CI)

The generator version is pinned in constraints/ci.txt (grpcio-tools), so the output is stable.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client"
GENERATED = "tokenrelay/v1"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / GENERATED).glob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(base: Path) -> set[str]:
    return {p.name for p in (base / GENERATED).glob("*_pb2*.py*")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs drift")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        fresh, committed = generated_files(tmp_dir), generated_files(OUT)
        if args.check:
            drift = sorted(fresh ^ committed) + sorted(
                name for name in fresh & committed
                if not filecmp.cmp(tmp_dir / GENERATED / name, OUT / GENERATED / name, shallow=False))
            if drift:
                print("generated stubs drift from protos/: " + ", ".join(drift), file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            return 0
        for name in committed - fresh:
            (OUT / GENERATED / name).unlink()
        for name in fresh:
            shutil.copyfile(tmp_dir / GENERATED / name, OUT / GENERATED / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the Python stubs in client/tokenrelay/v1 from protos/ (the one command).

    python scripts/gen_protos.py          # write the stubs
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs differ (CI)

The generator version is pinned in constraints/ci.txt (grpcio-tools), so the output is stable.

The output is made to work across the range the client claims in client/pyproject.toml
(protobuf >= 5.26.1, grpcio >= the version named there), not only with the generator's own
versions: the gencode's runtime check, which refuses any protobuf older than the generator's,
is taken out of *_pb2.py, and *_pb2_grpc.py requires the client's minimum grpcio. CI runs the
client's suite with those oldest versions (scripts/ci_client_oldest.sh) and with the newest.
"""

from __future__ import annotations

import argparse
import filecmp
import re
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


_RUNTIME_CHECK = re.compile(
    r"from google\.protobuf import runtime_version as _runtime_version\n"
    r"(?P<between>(?:.*\n)*?)"
    r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)*?\)\n")
_GRPC_VERSION = re.compile(r"^GRPC_GENERATED_VERSION = '[0-9.]+'$", re.MULTILINE)


def client_minimum(package: str) -> str:
    """The lowest version of `package` that client/pyproject.toml allows ("grpcio>=1.63.0")."""
    text = (OUT / "pyproject.toml").read_text()
    found = re.search(rf'"{re.escape(package)}>=([0-9][0-9.]*)', text)
    if found is None:
        raise SystemExit(f"client/pyproject.toml names no {package}>=VERSION")
    return found.group(1)


def widen(out_dir: Path) -> None:
    """Make the generated code load on every protobuf / grpcio version the client claims."""
    grpc_minimum = client_minimum("grpcio")
    for path in sorted((out_dir / GENERATED).glob("*_pb2.py")):
        text, count = _RUNTIME_CHECK.subn(
            lambda m: m.group("between") + "# (gen_protos.py: no gencode runtime check; the client "
                      "supports protobuf>=" + client_minimum("protobuf") + ")\n", path.read_text())
        if count != 1:
            raise SystemExit(f"{path.name}: the gencode runtime check was not found")
        path.write_text(text)
    for path in sorted((out_dir / GENERATED).glob("*_pb2_grpc.py")):
        text, count = _GRPC_VERSION.subn(f"GRPC_GENERATED_VERSION = '{grpc_minimum}'", path.read_text())
        if count != 1:
            raise SystemExit(f"{path.name}: GRPC_GENERATED_VERSION was not found")
        path.write_text(text)


def generated_files(base: Path) -> set[str]:
    return {p.name for p in (base / GENERATED).glob("*_pb2*.py*")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs drift")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        widen(tmp_dir)
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

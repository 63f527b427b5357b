#!/usr/bin/env python3
"""Generate the Python code for protos/unimodel/v1/*.proto into services/unimodel/v1/.

    python scripts/gen_protos.py          # regenerate (commit the result)
    python scripts/gen_protos.py --check  # exit 1 when the committed code has drifted

protoc's `import "unimodel/v1/x.proto"` becomes `from unimodel.v1 import x_pb2`, so the generated modules
live in the `unimodel.v1` package itself and need no import rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "unimodel" / "v1"
OUT_ROOT = ROOT / "services"
GEN_DIR = OUT_ROOT / "unimodel" / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC code for protos/unimodel/v1 (scripts/gen_protos.py)."""\n'


def generate(out_root: Path) -> None:
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("gen_protos: grpcio-tools is not installed (pip install -e '.[dev]')")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("gen_protos: protoc failed")
    (out_root / "unimodel" / "v1" / "__init__.py").write_text(INIT_TEXT)


def generated_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when committed code differs from protoc's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / "unimodel" / "v1").mkdir(parents=True)
        generate(tmp_root)
        fresh = tmp_root / "unimodel" / "v1"
        if args.check:
            if not GEN_DIR.is_dir():
                print(f"gen_protos: {GEN_DIR.relative_to(ROOT)} is missing; run scripts/gen_protos.py")
                return 1
            want, have = generated_files(fresh), generated_files(GEN_DIR)
            drift = sorted(want ^ have)
            drift += sorted(n for n in want & have if not filecmp.cmp(fresh / n, GEN_DIR / n, shallow=False))
            if drift:
                print("gen_protos: generated code is stale: " + ", ".join(drift) + "; run scripts/gen_protos.py")
                return 1
            print("gen_protos: generated code is up to date")
            return 0
        if GEN_DIR.exists():
            for name in generated_files(GEN_DIR):
                (GEN_DIR / name).unlink()
        GEN_DIR.mkdir(parents=True, exist_ok=True)
        for name in generated_files(fresh):
            shutil.copy2(fresh / name, GEN_DIR / name)
    print(f"gen_protos: wrote {GEN_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

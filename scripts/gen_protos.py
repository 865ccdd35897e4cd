"""Regenerates the committed gRPC stubs in kimi_grpc/proto/ from protos/kimi/v1/inference.proto.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: kimi_grpc/proto)

protoc writes ``kimi/v1/inference_pb2*.py``; we flatten them into one package and point the
service stub's import at ``kimi_grpc.proto`` so the stubs import without touching ``sys.path``.
The descriptor keeps its proto path ``kimi/v1/inference.proto`` (what reflection clients see).
tests/test_proto_stubs.py regenerates into a temporary folder and compares byte for byte.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTO = "kimi/v1/inference.proto"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
PROTOC_IMPORT = "from kimi.v1 import inference_pb2"
PACKAGE_IMPORT = "from kimi_grpc.proto import inference_pb2"


def generate(out_dir: Path) -> list[Path]:
    """Writes the three stub files into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "kimi" / "v1" / name).read_text(encoding="utf-8")
            text = text.replace(PROTOC_IMPORT, PACKAGE_IMPORT)
            target = out_dir / name
            target.write_text(text, encoding="utf-8")
            written.append(target)
    return written


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "kimi_grpc" / "proto"
    for path in generate(out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

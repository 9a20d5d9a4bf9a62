"""Regenerate the committed gencode (kvfabric_pb2.py, .pyi, kvfabric_pb2_grpc.py) from kvfabric.proto.

    python3 -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.63.0
    /tmp/gt/bin/python protos/generate.py            # from the repository root; writes protos/
    python protos/generate.py --out DIR              # writes DIR/protos/ (the staleness test)

Why that old grpcio-tools (its protoc is 26.1): newer ones emit a protobuf module that refuses
any runtime older than the protoc that wrote it (grpcio-tools 1.85 → protobuf >= 7.35.1) and a
gRPC module that refuses any grpcio older than itself. Gencode from 1.63.0 carries no protobuf
runtime check and only warns below grpcio 1.63, so the same files load on protobuf 5.26.1 ... 7.x
and grpcio >= 1.62 (it passes ``_registered_method``, which 1.62 introduced). Checked with a real
gRPC round trip, upb and pure-Python backends: protobuf 5.26.1/grpcio 1.63.0, 5.29.6/1.85.1,
6.33.6/1.78.2, 7.36.2/1.85.1; grpcio 1.60.1 fails (no ``_registered_method``). Any other
grpcio-tools version works too, but its output differs in text (not in descriptor), and its
runtime floor rises with it; this script warns when that happens.

The proto is compiled with the repository root as the include path, so the gRPC module imports
``from protos import kvfabric_pb2`` as generated: no post-editing of the output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.63.0"
ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/kvfabric.proto"


def grpcio_tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def run_protoc(out_dir: Path, *extra_args: str) -> None:
    """Compile PROTO into ``out_dir`` (files land in ``out_dir/protos/``); raises on protoc errors.

    protoc runs in its own process: grpc_tools bundles a protobuf C++ runtime that crashed
    (segfault on import) in a test process that had already loaded other native extensions.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "protos").mkdir(exist_ok=True)
    # protoc resolves PROTO against the include path, so run it from the root.
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", *extra_args, PROTO]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {' '.join(args)}\n{result.stderr}")


def generate(out_dir: Path) -> list[Path]:
    """Write the Python module, its stub and the gRPC module; returns their paths."""
    if grpcio_tools_version() != PINNED_GRPCIO_TOOLS:
        warnings.warn(f"grpcio-tools {grpcio_tools_version()} is not the pinned {PINNED_GRPCIO_TOOLS}: "
                      "the output will raise the protobuf/grpcio runtime floor (see protos/generate.py)")
    run_protoc(out_dir, f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}")
    return [out_dir / "protos" / n for n in ("kvfabric_pb2.py", "kvfabric_pb2.pyi", "kvfabric_pb2_grpc.py")]


def descriptor_set(out_file: Path) -> bytes:
    """The FileDescriptorSet protoc builds from the proto (what the gencode embeds, without source info)."""
    run_protoc(out_file.parent, f"--descriptor_set_out={out_file}")
    return out_file.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (files go to OUT/protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

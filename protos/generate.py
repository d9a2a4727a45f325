"""Regenerate the committed gRPC stubs: `python -m splitserve.protos.generate`.

The `.proto` files import each other as `splitserve/protos/x.proto`, so the generated code
imports `splitserve.protos.x_pb2` (the folder installs as `splitserve.protos`).
`tests/protos/test_stubs.py` fails when the committed stubs drift from the `.proto` files.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = ["common.proto", "tokenizer.proto", "scheduler.proto", "worker.proto"]


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files for every proto into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{include}",
            f"-Isplitserve/protos={HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ]
        args += [f"splitserve/protos/{p}" for p in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for f in sorted((pathlib.Path(tmp) / "splitserve" / "protos").iterdir()):
            dest = out_dir / f.name
            shutil.copyfile(f, dest)
            written.append(dest)
        return written


if __name__ == "__main__":
    for path in generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)

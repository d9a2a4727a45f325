"""Regenerate the committed gRPC stubs: `python -m splitserve.protos.generate`.

The shipped `.proto` files import each other by bare name (`import "common.proto";`), so a
client compiles them with a plain `python -m grpc_tools.protoc -I protos ...` (README, "Calling
the scheduler directly"). The package's own stubs must import `splitserve.protos.common_pb2`
and register their files under names no other package uses, so they are compiled from a copy
staged as `splitserve/protos/x.proto` with its imports spelled the same way: protoc derives
both the Python module path and the descriptor's file name from the import path.
`tests/protos/test_stubs.py` fails when the committed stubs drift from the `.proto` files.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = ["common.proto", "tokenizer.proto", "scheduler.proto", "worker.proto"]
PACKAGE_DIR = "splitserve/protos"

_IMPORT = re.compile(r'^import "(\w+\.proto)";$', re.M)


def stage(dest: pathlib.Path) -> None:
    """Copy the `.proto` files into dest/splitserve/protos with their imports namespaced."""
    staged = dest / PACKAGE_DIR
    staged.mkdir(parents=True)
    for name in PROTOS:
        text = (HERE / name).read_text()
        for imported in _IMPORT.findall(text):
            if imported not in PROTOS:
                raise ValueError(f"{name} imports {imported}, which is not one of {PROTOS}")
        (staged / name).write_text(_IMPORT.sub(rf'import "{PACKAGE_DIR}/\1";', text))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files for every proto into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        src, gen = pathlib.Path(tmp) / "src", pathlib.Path(tmp) / "gen"
        gen.mkdir()
        stage(src)
        args = [
            "protoc",
            f"-I{include}",
            f"-I{src}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
        ]
        args += [f"{PACKAGE_DIR}/{p}" for p in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for f in sorted((gen / PACKAGE_DIR).iterdir()):
            dest = out_dir / f.name
            shutil.copyfile(f, dest)
            written.append(dest)
        return written


if __name__ == "__main__":
    for path in generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)

"""Generating the Python gRPC stubs from proto/quiver/v1/*.proto into runtime/server/pb/.

    python -m runtime.server.build_proto            # set-up (scripts/setup.sh, make proto)
    from runtime.server.pb.quiver.v1 import generation_pb2, generation_pb2_grpc

Stubs are build products, never committed (runtime/server/pb/ is git-ignored). Layout choice:
protoc runs with `-I proto`, so descriptors keep the canonical file names other languages and
grpcurl see (`quiver/v1/generation.proto`), and the files land in pb/quiver/v1/. protoc writes
cross-file imports as `from quiver.v1 import x_pb2`, which only works with pb/ on sys.path; we
rewrite that one import form to `from runtime.server.pb.quiver.v1 import x_pb2` instead of
touching sys.path, so `runtime.server.pb` is an ordinary package. Also written: `.pyi` type
stubs, and `quiver_v1.binpb`, a self-contained descriptor set for clients without reflection
(`grpcurl -protoset runtime/server/pb/quiver_v1.binpb ...`).

Idempotent and fast: a stamp records a hash of the .proto files and the protoc version, and a
matching stamp skips the build (milliseconds). A build goes to a temporary directory, then
replaces pb/ by rename under a file lock, so concurrent callers (pytest workers, a server
starting) never import a half-written package.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # runtime/server
OUT_DIR = PACKAGE_DIR / "pb"
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"  # repo root / proto
PROTO_PACKAGE = "quiver/v1"
STAMP = ".stamp"
DESCRIPTOR_SET = "quiver_v1.binpb"
#: protoc's import of a sibling file in the proto package, as it writes it.
_IMPORT_RE = re.compile(r"^from quiver\.v1 import ", re.MULTILINE)
_IMPORT_TO = "from runtime.server.pb.quiver.v1 import "


class ProtoBuildError(RuntimeError):
    """protoc failed, or the proto sources are missing; the message says which."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    files = sorted((proto_root / PROTO_PACKAGE).glob("*.proto"))
    if not files:
        raise ProtoBuildError(
            f"no .proto files under {proto_root / PROTO_PACKAGE}: run from a Quiver source checkout")
    return files


def source_hash(files: list[Path]) -> str:
    h = hashlib.sha256(f"grpcio-tools={_tools_version()}".encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def is_current(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT) -> bool:
    stamp = out_dir / STAMP
    return stamp.is_file() and stamp.read_text().strip() == source_hash(proto_files(proto_root))


def ensure(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT) -> bool:
    """Build the stubs unless they are current. Returns True if it built."""
    if is_current(out_dir, proto_root):
        return False
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(out_dir)):
        if is_current(out_dir, proto_root):  # another process built it while we waited
            return False
        _build(out_dir, proto_root)
    return True


def _lock_path(out_dir: Path) -> str:
    """A lock file outside the source tree (nothing for git to see), one per output dir."""
    key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"quiver-build-proto-{key}.lock")


def _build(out_dir: Path, proto_root: Path) -> None:
    files = proto_files(proto_root)
    tmp = Path(tempfile.mkdtemp(prefix=".pb-build-", dir=out_dir.parent))
    try:
        _run_protoc(files, proto_root, tmp)
        _make_package(tmp)
        (tmp / STAMP).write_text(source_hash(files) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_protoc(files: list[Path], proto_root: Path, out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            f"--descriptor_set_out={out / DESCRIPTOR_SET}", "--include_imports",
            *[str(f.relative_to(proto_root)) for f in files]]
    if protoc.main(args) != 0:
        raise ProtoBuildError(f"protoc failed on {', '.join(f.name for f in files)} (see above)")


def _make_package(root: Path) -> None:
    """__init__.py at every level, and sibling imports made package-relative (module docstring)."""
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    for f in root.rglob("*.py*"):  # .py and .pyi
        text = f.read_text()
        fixed = _IMPORT_RE.sub(_IMPORT_TO, text)
        if fixed != text:
            f.write_text(fixed)


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` in for `target` with renames (the old one is removed afterwards)."""
    old = None
    if target.exists():
        old = target.with_name(f".pb-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grpcio-tools")
    except PackageNotFoundError as e:
        raise ProtoBuildError("grpcio-tools is not installed: pip install grpcio-tools") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.server.build_proto", description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild even if the stamp says current")
    args = p.parse_args(argv)
    try:
        if args.force:
            (OUT_DIR / STAMP).unlink(missing_ok=True)
        built = ensure()
    except ProtoBuildError as e:
        print(f"build_proto: error: {e}", file=sys.stderr)
        return 1
    print(f"build_proto: {'built' if built else 'up to date'}: {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

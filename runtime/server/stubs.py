"""The generated protobuf / gRPC modules, imported from one place.

In a source checkout the stubs are (re)built here when missing or older than the .proto files
(build_proto.ensure: a hash check, milliseconds when current), so a fresh clone, an edited proto
and the test suite all just work. An installed package carries the stubs built at image / wheel
build time (Dockerfile) and has no proto/ to rebuild from.
"""
from __future__ import annotations

from runtime.server import build_proto

if (build_proto.PROTO_ROOT / build_proto.PROTO_PACKAGE).is_dir():
    build_proto.ensure()

try:
    from runtime.server.pb.quiver.v1 import (adapters_pb2, adapters_pb2_grpc, generation_pb2,
                                             generation_pb2_grpc, training_pb2, training_pb2_grpc)
except ModuleNotFoundError as e:  # pragma: no cover - an install without built stubs
    raise ImportError("Quiver's gRPC stubs are missing: run `python -m runtime.server.build_proto` "
                      "in the source tree before installing") from e

__all__ = ["adapters_pb2", "adapters_pb2_grpc", "generation_pb2", "generation_pb2_grpc", "training_pb2",
           "training_pb2_grpc"]

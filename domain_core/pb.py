"""The one import point for generated protobuf code (domain_core/_generated).

Other packages import messages and stubs from here, never from the generated folder.
"""

from __future__ import annotations

from domain_core._generated.hsmdomain.v1 import (
    domain_pb2,
    keys_pb2,
    services_pb2,
    services_pb2_grpc,
)

__all__ = ["domain_pb2", "keys_pb2", "services_pb2", "services_pb2_grpc"]

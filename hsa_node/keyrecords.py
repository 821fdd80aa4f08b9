"""The coordinator's key-record calls, as this host: how an HSA reads and writes key records.

The coordinator stores every customer key as a `KeyRecord` (metadata bytes and one exported
key token per backing version) and is not trusted: nothing read here is believed before
`hsa_node.keyverify` verified it. `KeyRecordClient` calls GetKey, PutKey, ListKeyRecords and
DeleteKeyRecord over mutual TLS as this host, each with a deadline.

Invariants:
- every call has a deadline; only PutKey is sent again here (the same bytes, a bounded number
  of times, when no answer came): the coordinator answers a replayed record with the stored
  revision, so a retry after a lost answer never writes twice. Callers decide the rest;
- every failure is a domain error; `CoordinatorUnreachableError` when the coordinator did not
  answer (a write may still have reached it), and its subclass `CoordinatorNotReachedError`
  only when the request surely never left (no connection could be made, or no coordinator is
  configured), so the coordinator changed nothing;
- what the coordinator says in an error is cut to 200 characters before it reaches a message.
"""

from __future__ import annotations

from typing import Any, Final, cast

import grpc
import tenacity
from google.protobuf.message import DecodeError

from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from domain_edge import transport
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

__all__ = [
    "CALL_DEADLINE_SECONDS",
    "CoordinatorNotReachedError",
    "CoordinatorUnreachableError",
    "KeyRecordClient",
    "parse_metadata",
]

CALL_DEADLINE_SECONDS: Final = 3.0
PUT_ATTEMPTS: Final = 3  # PutKey sent at most this often when no answer came (idempotent)
PUT_BACKOFF_SECONDS: Final = 0.1
_SHOWN: Final = 200


class CoordinatorUnreachableError(UnavailableError):
    """The coordinator did not answer a key-record call (down, paused, or refusing us).

    A write may still have reached it (a deadline passed, a connection was lost mid-call)."""


class CoordinatorNotReachedError(CoordinatorUnreachableError):
    """The key-record call never left this HSA (no connection, or no coordinator configured):
    the coordinator changed nothing."""


def parse_metadata(record: keys_pb2.KeyRecord) -> keys_pb2.KeyMetadata | None:
    """The metadata a record carries (not verified), or None if its bytes do not parse."""
    metadata = keys_pb2.KeyMetadata()
    try:
        metadata.ParseFromString(record.metadata)
    except DecodeError:
        return None
    return metadata


def _rpc_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = cast(Any, error).code() if hasattr(error, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def _rpc_details(error: grpc.RpcError) -> str:
    details = cast(Any, error).details() if hasattr(error, "details") else None
    return str(details or "")[:_SHOWN]


class KeyRecordClient:
    """The coordinator's key-record calls, as this host, each with a deadline.

    Failures become domain errors: NOT_FOUND -> NotFoundError (None for `get`), ABORTED ->
    ConflictError, ALREADY_EXISTS -> AlreadyExistsError, FAILED_PRECONDITION ->
    FailedPreconditionError, INVALID_ARGUMENT -> InvalidInputError, RESOURCE_EXHAUSTED ->
    ResourceExhaustedError (a quota), PERMISSION_DENIED -> UnavailableError (the coordinator
    refuses this host, e.g. while it is being removed: use another HSA), anything else
    (unreachable, deadline exceeded, internal) -> CoordinatorUnreachableError, or
    CoordinatorNotReachedError when gRPC says no connection was made (nothing was sent).
    Only PutKey (idempotent) is sent again here; callers decide the rest.
    """

    def __init__(
        self,
        channel: grpc.Channel | None,
        address: str,
        *,
        deadline: float = CALL_DEADLINE_SECONDS,
    ) -> None:
        """`channel` None: no coordinator is configured, and every call is unreachable."""
        self._stub = (
            services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            if channel is not None
            else None
        )
        self._address = address
        self._deadline = deadline

    @property
    def address(self) -> str:
        """The coordinator's address, for messages."""
        return self._address

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        if self._stub is None:
            raise CoordinatorNotReachedError(
                f"no coordinator is configured on this HSA to call {method}"
            )
        try:
            return getattr(self._stub, method)(
                request, timeout=self._deadline if timeout is None else timeout
            )
        except grpc.RpcError as error:
            raise self._error(method, error) from None

    def _error(self, method: str, error: grpc.RpcError) -> Exception:
        code, details = _rpc_code(error), _rpc_details(error)
        if code is grpc.StatusCode.NOT_FOUND:
            return NotFoundError(details or "not found at the coordinator")
        if code is grpc.StatusCode.ABORTED:
            return ConflictError(details or "the record changed meanwhile")
        if code is grpc.StatusCode.ALREADY_EXISTS:
            return AlreadyExistsError(details or "the key exists already")
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPreconditionError(f"the coordinator refused {method}: {details}")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInputError(f"the coordinator refused {method}: {details}")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhaustedError(f"the coordinator refused {method}: {details}")
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return UnavailableError(
                f"the coordinator refused {method} from this HSA ({details}): use another HSA"
            )
        name = code.name if code is not None else "ERROR"
        if transport.never_sent(code, details):
            return CoordinatorNotReachedError(
                f"the coordinator at {self._address} cannot be reached to call {method} "
                f"({name}: {details})"
            )
        return CoordinatorUnreachableError(
            f"the coordinator at {self._address} did not answer {method} ({name}: {details})"
        )

    def get(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.KeyRecord | None:
        """The stored record of `key_id` with its revision, or None if there is none."""
        try:
            record: keys_pb2.KeyRecord = self._call(
                "GetKey", services_pb2.GetKeyRequest(key_id=key_id), timeout
            )
        except NotFoundError:
            return None
        return record

    def put(self, record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        """Store `record` if the stored revision is `expected_revision` (0: create); the new
        revision, once the coordinator committed it.

        PutKey is idempotent (its key is the signed record: a replica that finds these very
        bytes stored answers with their revision), so when no answer came the same request is
        sent again, `PUT_ATTEMPTS` times at most, to whichever replica is up; the last
        CoordinatorUnreachableError is raised when none answered.
        """
        request = services_pb2.PutKeyRequest(record=record, expected_revision=expected_revision)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(CoordinatorUnreachableError),
            stop=tenacity.stop_after_attempt(PUT_ATTEMPTS),
            wait=tenacity.wait_exponential(multiplier=PUT_BACKOFF_SECONDS, max=1.0),
            reraise=True,
        )
        response: services_pb2.PutKeyResponse = retrying(self._call, "PutKey", request, None)
        return int(response.revision)

    def list(self, limit: int, page_token: str = "") -> tuple[list[keys_pb2.KeyRecord], str]:
        """One page of stored records (with revisions) and the token of the next page."""
        response: services_pb2.ListKeyRecordsResponse = self._call(
            "ListKeyRecords",
            services_pb2.ListKeyRecordsRequest(limit=limit, page_token=page_token),
            None,
        )
        return list(response.records), response.next_page_token

    def delete(self, key_id: str, expected_revision: int) -> None:
        """Delete a key whose deletion date has passed, if it is still at `expected_revision`."""
        self._call(
            "DeleteKeyRecord",
            services_pb2.DeleteKeyRecordRequest(key_id=key_id, expected_revision=expected_revision),
            None,
        )

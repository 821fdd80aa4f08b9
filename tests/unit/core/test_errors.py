"""domain_core.errors and domain_edge.status: one hierarchy, one status per class (one gRPC
status through the edge's one table), no detail in crypto errors."""

from __future__ import annotations

import importlib

import grpc
import pytest

from domain_core import errors
from domain_core.errors import HsmDomainError, Status, status_for
from domain_edge.status import GRPC_STATUS, grpc_status_for

pytestmark = pytest.mark.unit


# Library modules whose error classes must follow the rules too (import-safe, no I/O).
LIBRARY_MODULES = (
    "domain_core.errors",
    "domain_core.canonical",
    "domain_core.crypto",
    "domain_core.model",
    "domain_core.quorum",
    "domain_core.transition",
    "domain_core.sealing",
    "domain_core.chain",
    "domain_core.genesis",
    "domain_core.limits",
    "domain_core.signers",
    "domain_core.identity",
    "domain_core.pki",
    "domain_edge.audit",
)


def _import_library_modules() -> None:
    """Subclasses defined elsewhere in the core and the edge count, not just those in errors.py."""
    for name in LIBRARY_MODULES:
        importlib.import_module(name)


def _all_subclasses(cls: type) -> list[type]:
    found: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_import_library_modules()
# Only the core's and the edge's own classes: which other packages happen to be imported
# depends on which tests ran first, and a parametrization must not change with that.
ALL_ERRORS = sorted(
    {
        c
        for c in _all_subclasses(HsmDomainError)
        if c.__module__.startswith(("domain_core.", "domain_edge."))
    },
    key=lambda c: c.__qualname__,
)


def _instance(cls: type[HsmDomainError]) -> HsmDomainError:
    try:
        return cls("what went wrong; what to do")
    except TypeError:
        return cls()


def test_hierarchy_is_not_empty() -> None:
    assert len(ALL_ERRORS) >= 30


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__qualname__)
def test_every_error_maps_to_one_status(cls: type[HsmDomainError]) -> None:
    assert isinstance(cls.status, Status)
    # INTERNAL is for bugs, not for errors the domain raises on purpose.
    assert cls.status is not Status.INTERNAL, f"{cls.__name__} maps to INTERNAL"
    error = cls.__new__(cls)  # whatever its constructor needs, the status is per class
    assert status_for(error) is cls.status
    assert grpc_status_for(error) is GRPC_STATUS[cls.status]
    assert not isinstance(error, ValueError | TypeError | RuntimeError)
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no docstring"


EXPECTED = {
    "InvalidInputError": grpc.StatusCode.INVALID_ARGUMENT,
    "MalformedMessageError": grpc.StatusCode.INVALID_ARGUMENT,
    "LimitExceededError": grpc.StatusCode.INVALID_ARGUMENT,
    "WrongDomainError": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidCiphertextError": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidKeyTokenError": grpc.StatusCode.INVALID_ARGUMENT,
    "VerificationError": grpc.StatusCode.PERMISSION_DENIED,
    "BadSignatureError": grpc.StatusCode.PERMISSION_DENIED,
    "UnknownSignerError": grpc.StatusCode.PERMISSION_DENIED,
    "QuorumNotMetError": grpc.StatusCode.FAILED_PRECONDITION,
    "ChainError": grpc.StatusCode.FAILED_PRECONDITION,
    "RollbackError": grpc.StatusCode.FAILED_PRECONDITION,
    "ForkError": grpc.StatusCode.FAILED_PRECONDITION,
    "ChainGapError": grpc.StatusCode.FAILED_PRECONDITION,
    "GenesisMismatchError": grpc.StatusCode.FAILED_PRECONDITION,
    "TransitionMismatchError": grpc.StatusCode.FAILED_PRECONDITION,
    "ProposalError": grpc.StatusCode.FAILED_PRECONDITION,
    "ProposalExpiredError": grpc.StatusCode.FAILED_PRECONDITION,
    "StaleProposalError": grpc.StatusCode.ABORTED,
    "RotationNotDueError": grpc.StatusCode.FAILED_PRECONDITION,
    "InvariantViolation": grpc.StatusCode.FAILED_PRECONDITION,
    "NoHostsError": grpc.StatusCode.FAILED_PRECONDITION,
    "ThresholdOutOfRangeError": grpc.StatusCode.FAILED_PRECONDITION,
    "QuorumUnreachableError": grpc.StatusCode.FAILED_PRECONDITION,
    "DuplicateHostError": grpc.StatusCode.FAILED_PRECONDITION,
    "DuplicateOperatorError": grpc.StatusCode.FAILED_PRECONDITION,
    "UnknownHostError": grpc.StatusCode.FAILED_PRECONDITION,
    "UnknownOperatorError": grpc.StatusCode.FAILED_PRECONDITION,
    "InvalidSettingsError": grpc.StatusCode.FAILED_PRECONDITION,
    "NotFoundError": grpc.StatusCode.NOT_FOUND,
    "AlreadyExistsError": grpc.StatusCode.ALREADY_EXISTS,
    "ConflictError": grpc.StatusCode.ABORTED,
    "FailedPreconditionError": grpc.StatusCode.FAILED_PRECONDITION,
    "PermissionDeniedError": grpc.StatusCode.PERMISSION_DENIED,
    "UnauthenticatedError": grpc.StatusCode.UNAUTHENTICATED,
    "UnavailableError": grpc.StatusCode.UNAVAILABLE,
    "TransitionDeferredError": grpc.StatusCode.UNAVAILABLE,
    "TokenError": grpc.StatusCode.UNAUTHENTICATED,
    "WrongPassphraseError": grpc.StatusCode.UNAUTHENTICATED,
    "TokenNotFoundError": grpc.StatusCode.NOT_FOUND,
}


@pytest.mark.parametrize(("name", "status"), sorted(EXPECTED.items()))
def test_status_table(name: str, status: grpc.StatusCode) -> None:
    cls = getattr(errors, name)
    assert cls.status.name == status.name
    assert status_for(_instance(cls)) is cls.status
    assert grpc_status_for(_instance(cls)) is status


def test_the_edge_maps_every_status_to_the_grpc_code_of_its_name() -> None:
    assert set(GRPC_STATUS) == set(Status)
    for status, code in GRPC_STATUS.items():
        assert code is grpc.StatusCode[status.name]
        assert status.value == status.name


@pytest.mark.parametrize(
    ("cls", "family"),
    [
        (errors.BadSignatureError, errors.VerificationError),
        (errors.UnknownSignerError, errors.VerificationError),
        (errors.QuorumNotMetError, errors.VerificationError),
        (errors.RollbackError, errors.ChainError),
        (errors.ForkError, errors.ChainError),
        (errors.ChainGapError, errors.ChainError),
        (errors.GenesisMismatchError, errors.ChainError),
        (errors.TransitionMismatchError, errors.ChainError),
        (errors.ChainError, errors.VerificationError),
        (errors.StaleProposalError, errors.ProposalError),
        (errors.ProposalExpiredError, errors.ProposalError),
        (errors.RotationNotDueError, errors.ProposalError),
        (errors.NoHostsError, errors.InvariantViolation),
        (errors.MalformedMessageError, errors.InvalidInputError),
        (errors.InvalidKeyTokenError, errors.InvalidInputError),
        (errors.InvalidCiphertextError, errors.InvalidInputError),
        (errors.WrongPassphraseError, errors.TokenError),
        (errors.TransitionDeferredError, errors.UnavailableError),
    ],
)
def test_families(cls: type, family: type) -> None:
    assert issubclass(cls, family)


def test_crypto_errors_carry_fixed_messages() -> None:
    assert str(errors.InvalidCiphertextError()) == "invalid ciphertext"
    assert errors.InvalidCiphertextError().message == "invalid ciphertext"
    assert errors.InvalidCiphertextError().args == ("invalid ciphertext",)
    assert str(errors.InvalidKeyTokenError()) == "invalid key token"
    assert errors.InvalidKeyTokenError().args == ("invalid key token",)


def test_message_is_the_string() -> None:
    error = errors.QuorumNotMetError("1 of 2 approvals")
    assert str(error) == error.message == "1 of 2 approvals"


@pytest.mark.parametrize(
    "error", [ValueError(), TypeError("x"), RuntimeError(), KeyError("k"), Exception()]
)
def test_foreign_errors_are_internal(error: BaseException) -> None:
    assert status_for(error) is Status.INTERNAL
    assert grpc_status_for(error) is grpc.StatusCode.INTERNAL


def test_base_error_is_internal() -> None:
    assert status_for(HsmDomainError("bug")) is Status.INTERNAL
    assert grpc_status_for(HsmDomainError("bug")) is grpc.StatusCode.INTERNAL

"""One exception hierarchy for the whole domain, each class mapped to one status.

Invariants kept here:
- every error a server can return is a subclass of `HsmDomainError` and carries exactly one
  `Status` (`status`, named as gRPC names its status codes); the edge turns it into a
  `grpc.StatusCode` in one table (`domain_edge.status`), so servers map errors in one place
  (an interceptor) and this module, like the whole core, imports no grpc;
- messages say what was wrong and what to do, and never hold key material, plaintext,
  passphrases or PINs;
- ciphertext and key-token failures collapse into `InvalidCiphertextError` / `InvalidKeyTokenError`
  with a fixed message, so they cannot serve as an oracle;
- an error class that says the call changed nothing (`nothing_applied`, e.g. `NotAppliedError`)
  is marked so on the wire by the transport, so that a client can tell it from a call whose
  outcome is unknown (a connection lost, a deadline passed);
- the classes of `WIRE_KINDS` travel by name beside their status (the transport's error kind),
  so that a client raises the same class the server did where one status covers several
  meanings (INVALID_ARGUMENT: a bad argument, or a key of the wrong usage);
- programming errors are `TypeError` / `ValueError` / `RuntimeError`, never a domain error.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import ClassVar, Final


class Status(enum.Enum):
    """What kind of failure an error is, by the name of the gRPC status it is answered with.

    The core's own enum, so that the core needs no grpc; `domain_edge.status` maps each member
    to the `grpc.StatusCode` of the same name, and audit records carry the name.
    """

    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class HsmDomainError(Exception):
    """Base of every error the domain reports to a person or a peer."""

    status: ClassVar[Status] = Status.INTERNAL
    # True when raising this error means the call changed nothing, though its status alone
    # (UNAVAILABLE) would leave that open: the transport marks it so in trailing metadata.
    nothing_applied: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- bad input -------------------------------------------------------------------------------


class InvalidInputError(HsmDomainError):
    """A request or document is malformed or out of range; fix the input and retry."""

    status = Status.INVALID_ARGUMENT


class MalformedMessageError(InvalidInputError):
    """Bytes that should hold a protocol message do not parse or miss required fields."""


class LimitExceededError(InvalidInputError):
    """An input is larger than a configured limit (message size, hosts, operators, ...)."""


class WrongDomainError(InvalidInputError):
    """A document names another domain than the one it was sent to."""


class InvalidCiphertextError(InvalidInputError):
    """Any ciphertext that does not open. Deliberately carries no detail (no oracle)."""

    def __init__(self, message: str = "invalid ciphertext") -> None:
        super().__init__(message)


class InvalidKeyUsageError(InvalidInputError):
    """A key asked for an operation its key spec or usage does not allow (Sign with an
    encryption key, an algorithm of another key type); AWS KMS's InvalidKeyUsageException."""


class UnsupportedOperationError(InvalidInputError):
    """An operation this key's spec does not offer at all (e.g. rotating an asymmetric key);
    AWS KMS's UnsupportedOperationException."""


class InvalidImportTokenError(InvalidInputError):
    """An import token that does not open (any reason: no oracle); AWS KMS's
    InvalidImportTokenException."""

    def __init__(self, message: str = "invalid import token") -> None:
        super().__init__(message)


class InvalidGrantTokenError(InvalidInputError):
    """A grant token that does not open (any reason: no oracle); AWS KMS's
    InvalidGrantTokenException."""

    def __init__(self, message: str = "invalid grant token") -> None:
        super().__init__(message)


class ExpiredImportTokenError(InvalidInputError):
    """An import token past its expiry; AWS KMS's ExpiredImportTokenException."""


class IncorrectKeyMaterialError(InvalidInputError):
    """Material that is not the key's earlier material; AWS KMS's
    IncorrectKeyMaterialException."""


class InvalidKeyTokenError(InvalidInputError):
    """A key token or sealed secret that does not open. Carries no detail (no oracle)."""

    def __init__(self, message: str = "invalid key token") -> None:
        super().__init__(message)


# --- verification ----------------------------------------------------------------------------


class VerificationError(HsmDomainError):
    """Something signed or chained did not verify; the data must not be believed."""

    status = Status.PERMISSION_DENIED


class BadSignatureError(VerificationError):
    """A signature does not verify under the key it claims."""


class UnknownSignerError(VerificationError):
    """A signature comes from a key that is not trusted here (unknown or removed)."""


class EnrollmentError(VerificationError):
    """A host enrollment does not prove what it names: a key its holder did not sign with, a
    certificate the domain CA did not issue for that host. The host must enroll again."""


class QuorumNotMetError(VerificationError):
    """Fewer valid approvals than the threshold; more operators must approve."""

    status = Status.FAILED_PRECONDITION


class ChainError(VerificationError):
    """A domain state does not extend the verified chain."""

    status = Status.FAILED_PRECONDITION


class RollbackError(ChainError):
    """A state older than the current one was offered."""


class ForkError(ChainError):
    """Two different states claim the same version, or a state does not follow its parent."""


class ChainGapError(ChainError):
    """A state skips versions; the missing states must be fetched first."""


class GenesisMismatchError(ChainError):
    """The genesis state does not hash to the pinned genesis hash."""


class FutureStateError(ChainError):
    """A state is dated later than this node's clock allows; one of the two clocks is wrong."""


class TransitionMismatchError(ChainError):
    """A state's manifest is not what its proposal produces from the previous state."""


class BackupError(VerificationError):
    """A backup file that does not verify: cut short, damaged, larger than its limits, of
    another domain, or holding something forged. Nothing of it may be restored."""

    status = Status.FAILED_PRECONDITION


# --- proposals -------------------------------------------------------------------------------


class ProposalError(HsmDomainError):
    """A proposal cannot be applied as it is."""

    status = Status.FAILED_PRECONDITION


class ProposalExpiredError(ProposalError):
    """The proposal's expiry has passed; propose again."""


class StaleProposalError(ProposalError):
    """The proposal was made for an older domain version; propose again against the current one."""

    status = Status.ABORTED


class RotationNotDueError(ProposalError):
    """A domain key rotation without quorum was requested before the rotation interval passed."""


# --- invariants of the state transition ------------------------------------------------------


class InvariantViolation(HsmDomainError):
    """A change would break one of the domain's invariants; the proposal must be changed."""

    status = Status.FAILED_PRECONDITION


class NoHostsError(InvariantViolation):
    """The change would leave the domain without a trusted host."""


class ThresholdOutOfRangeError(InvariantViolation):
    """A quorum threshold is below 1 or above the number of operators."""


class QuorumUnreachableError(InvariantViolation):
    """After the change, fewer operators would remain than some threshold needs."""


class DuplicateHostError(InvariantViolation):
    """A host id, host key or TLS fingerprint is already in the domain."""


class DuplicateOperatorError(InvariantViolation):
    """An operator id, name or key is already in the domain."""


class UnknownHostError(InvariantViolation):
    """A change names a host that is not in the domain."""


class UnknownOperatorError(InvariantViolation):
    """A change names an operator that is not in the domain."""


class InvalidSettingsError(InvariantViolation):
    """Domain settings out of their allowed range."""


# --- lookup, concurrency, access, availability -----------------------------------------------


class NotFoundError(HsmDomainError):
    """The named object does not exist."""

    status = Status.NOT_FOUND


class AlreadyExistsError(HsmDomainError):
    """The object to create exists already."""

    status = Status.ALREADY_EXISTS


class ConflictError(HsmDomainError):
    """A compare-and-swap lost against a concurrent writer; re-read and retry."""

    status = Status.ABORTED


class FailedPreconditionError(HsmDomainError):
    """The object is in a state that does not allow the operation (disabled, pending deletion)."""

    status = Status.FAILED_PRECONDITION


class PermissionDeniedError(HsmDomainError):
    """The caller's identity is not allowed to do this."""

    status = Status.PERMISSION_DENIED


class UnauthenticatedError(HsmDomainError):
    """The caller presented no usable identity."""

    status = Status.UNAUTHENTICATED


class ResourceExhaustedError(HsmDomainError):
    """A bounded resource (streams, concurrent calls) is used up; retry later."""

    status = Status.RESOURCE_EXHAUSTED


class ThrottledError(ResourceExhaustedError):
    """A caller over its request-rate quota: nothing was done; send the call again after
    `retry_after` seconds (a client honours it with back-off)."""

    nothing_applied = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))


class UnavailableError(HsmDomainError):
    """A service this call needs cannot be reached now; retry later or use another node."""

    status = Status.UNAVAILABLE


class TransitionDeferredError(UnavailableError):
    """A domain change cannot be applied yet (e.g. key records must be re-signed or re-wrapped
    first); nothing is wrong with it and the coordinator retries it."""


class NotAppliedError(UnavailableError):
    """A service this call needs could not be reached, and the call changed nothing: a definite
    failure, safe to send again (to any node, now or later). Raise it only where it is certain
    that nothing was done (the request never left for the service it needed)."""

    nothing_applied = True


# --- operator tokens (local, client side) ----------------------------------------------------


class TokenError(HsmDomainError):
    """An operator or host token cannot be opened or used."""

    status = Status.UNAUTHENTICATED


class WrongPassphraseError(TokenError):
    """The passphrase or PIN does not open the token."""


class TokenNotFoundError(TokenError):
    """No token at the given path, URI or label."""

    status = Status.NOT_FOUND


def status_for(error: BaseException) -> Status:
    """The one status an error maps to; anything not ours is INTERNAL."""
    if isinstance(error, HsmDomainError):
        return error.status
    return Status.INTERNAL


# The classes whose name a server sends beside the status (see the module invariants).
WIRE_KINDS: Final[Mapping[str, type[HsmDomainError]]] = {
    cls.__name__: cls
    for cls in (
        InvalidKeyUsageError,
        UnsupportedOperationError,
        InvalidImportTokenError,
        ExpiredImportTokenError,
        IncorrectKeyMaterialError,
        InvalidGrantTokenError,
    )
}

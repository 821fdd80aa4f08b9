"""Enrollment files: the bytes `hsm-domain add-node` writes for operators to propose.

Invariants: a file of more than `MAX_ENROLLMENT_BYTES` is refused (LimitExceededError, as
verification refuses such an enrollment) after reading at most one byte more; what is read is
verified completely (`domain_core.enrollment.verify_enrollment`) before anything uses it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from domain_core.enrollment import VerifiedEnrollment, verify_enrollment
from domain_core.errors import LimitExceededError, NotFoundError
from domain_core.limits import MAX_ENROLLMENT_BYTES
from domain_edge.files import read_limited

__all__ = ["read_enrollment", "read_enrollment_file"]


def read_enrollment_file(path: Path) -> bytes:
    """The bytes of an enrollment file (at most `MAX_ENROLLMENT_BYTES`, not verified)."""
    path = Path(path)
    try:
        return read_limited(
            path,
            MAX_ENROLLMENT_BYTES,
            lambda: LimitExceededError(
                f"an enrollment is at most {MAX_ENROLLMENT_BYTES} bytes; {path} is larger"
            ),
        )
    except FileNotFoundError:
        raise NotFoundError(f"no enrollment file at {path}") from None


def read_enrollment(
    path: Path, ca_certificate: bytes, domain_id: str, now: int | datetime
) -> VerifiedEnrollment:
    """Read and verify an enrollment file (see `verify_enrollment`)."""
    return verify_enrollment(
        read_enrollment_file(path), domain_id=domain_id, ca_certificate=ca_certificate, now=now
    )

"""Enrollment files: the bytes `hsm-domain add-node` writes for operators to propose.

Invariants: at most `MAX_ENROLLMENT_BYTES` (+1, so that a larger file fails verification as
too large) are read from a file; what is read is verified completely
(`domain_core.enrollment.verify_enrollment`) before anything uses it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from domain_core.enrollment import VerifiedEnrollment, verify_enrollment
from domain_core.errors import NotFoundError
from domain_core.model import MAX_ENROLLMENT_BYTES

__all__ = ["read_enrollment", "read_enrollment_file"]


def read_enrollment_file(path: Path) -> bytes:
    """The bytes of an enrollment file (at most `MAX_ENROLLMENT_BYTES`, not verified)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ENROLLMENT_BYTES + 1)
    except FileNotFoundError:
        raise NotFoundError(f"no enrollment file at {path}") from None
    return data


def read_enrollment(
    path: Path, ca_certificate: bytes, domain_id: str, now: int | datetime
) -> VerifiedEnrollment:
    """Read and verify an enrollment file (see `verify_enrollment`)."""
    return verify_enrollment(
        read_enrollment_file(path), domain_id=domain_id, ca_certificate=ca_certificate, now=now
    )

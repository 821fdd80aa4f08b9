"""Host enrollment files (made and verified in `domain_core.enrollment`, shared with
`operator_tool`; re-exported here for the deploy package)."""

from __future__ import annotations

from domain_core.enrollment import (
    MAX_ENROLLMENT_BYTES,
    VerifiedEnrollment,
    enrollment_signing_input,
    host_key_fingerprints,
    make_enrollment,
    read_enrollment,
    read_enrollment_file,
    verify_enrollment,
)

__all__ = [
    "MAX_ENROLLMENT_BYTES",
    "VerifiedEnrollment",
    "enrollment_signing_input",
    "host_key_fingerprints",
    "make_enrollment",
    "read_enrollment",
    "read_enrollment_file",
    "verify_enrollment",
]

"""Host enrollment files (the verification lives in `domain_core.enrollment`, shared with
`operator_tool`; re-exported here for the deploy package)."""

from __future__ import annotations

from domain_core.enrollment import (
    MAX_ENROLLMENT_BYTES,
    enrollment_signing_input,
    parse_enrollment,
    read_enrollment,
)

__all__ = [
    "MAX_ENROLLMENT_BYTES",
    "enrollment_signing_input",
    "parse_enrollment",
    "read_enrollment",
]

"""Host enrollment files (made and verified in `domain_core.enrollment`, read from files by
`domain_edge.enrollment_files`, shared with `operator_tool`; re-exported here for the deploy
package)."""

from __future__ import annotations

from domain_core.enrollment import (
    VerifiedEnrollment,
    enrollment_signing_input,
    host_key_fingerprints,
    make_enrollment,
    verify_enrollment,
)
from domain_edge.enrollment_files import (
    read_enrollment,
    read_enrollment_file,
)

__all__ = [
    "VerifiedEnrollment",
    "enrollment_signing_input",
    "host_key_fingerprints",
    "make_enrollment",
    "read_enrollment",
    "read_enrollment_file",
    "verify_enrollment",
]

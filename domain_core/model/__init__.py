"""Domain objects wrapping the generated messages; constructors validate.

Invariants:
- a `Proposal`, `Manifest` or `SealedState` object exists only for bytes that parsed and
  passed structural validation (sizes, formats, ids that match keys);
- a `Proposal` exists only for canonical bytes (`parse_canonical`): at most
  `Limits.max_proposal_bytes`, no unknown field at any depth, and exactly what the proposer's
  deterministic serialization of the parsed message gives, so approvers sign no byte they
  cannot see and there is one encoding per proposal. The operator tool, the coordinator and
  every HSA parse proposals only through `Proposal.from_bytes`;
- free text in a signed message (a proposal's reason, an operator's name) is printable
  (`domain_core.display.printable`): no control, line-break or format character reaches an
  operator's terminal from a message that parsed; ids (domain, host, operator, a state's
  producer) match their patterns in full (not even a trailing newline passes);
- signed things keep the exact bytes they were received as (`raw`); digests and ids are
  computed from those bytes, never from a re-serialization;
- semantic checks that need the current domain state (quorum, transition rules) live in
  `quorum` and `transition`, not here.

The package's modules: `_records` (ids, hosts, operators, enrollments, settings, changes) and
`_objects` (Proposal, Manifest, SealedState). This module names the public API.
"""

from __future__ import annotations

from domain_core.model._objects import (
    Manifest,
    Proposal,
    SealedState,
    state_hash,
)
from domain_core.model._records import (
    CHANGE_TYPE_NAMES,
    CHANGE_TYPES_BY_NAME,
    DEFAULT_GENERATIONS_RETAINED,
    DEFAULT_MAX_PROPOSAL_LIFETIME_SECONDS,
    DEFAULT_ROTATION_INTERVAL_SECONDS,
    DOMAIN_ID_PATTERN,
    HOST_ID_PATTERN,
    NONCE_BYTES,
    OPERATOR_ID_PATTERN,
    RECOVERY_SESSION_KEY_BYTES,
    ChangeType,
    added_host,
    algorithm_to_proto,
    change_type_name,
    change_type_of,
    default_settings,
    host_spiffe_id,
    make_host,
    make_operator,
    operator_public_key,
    parse_canonical,
    parse_enrollment,
    recovered_hosts,
    recovery_key_of,
    validate_domain_id,
    validate_host,
    validate_operator,
)

__all__ = [
    "CHANGE_TYPES_BY_NAME",
    "CHANGE_TYPE_NAMES",
    "DEFAULT_GENERATIONS_RETAINED",
    "DEFAULT_MAX_PROPOSAL_LIFETIME_SECONDS",
    "DEFAULT_ROTATION_INTERVAL_SECONDS",
    "DOMAIN_ID_PATTERN",
    "HOST_ID_PATTERN",
    "NONCE_BYTES",
    "OPERATOR_ID_PATTERN",
    "RECOVERY_SESSION_KEY_BYTES",
    "ChangeType",
    "Manifest",
    "Proposal",
    "SealedState",
    "added_host",
    "algorithm_to_proto",
    "change_type_name",
    "change_type_of",
    "default_settings",
    "host_spiffe_id",
    "make_host",
    "make_operator",
    "operator_public_key",
    "parse_canonical",
    "parse_enrollment",
    "recovered_hosts",
    "recovery_key_of",
    "state_hash",
    "validate_domain_id",
    "validate_host",
    "validate_operator",
]

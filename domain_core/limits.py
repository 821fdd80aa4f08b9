"""Every input limit and quota in one place, mirrored in gRPC server and channel options.

Values only: the token buckets that enforce the rate quotas at run time (a lock, a clock)
are `domain_edge.rate_limit.RateLimiter`.

A process takes its limits from its config file (`limits`: a JSON object of field names to
values, over these defaults; `Limits.with_overrides`), so an unknown name or a value of the
wrong kind is a clear error at start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from domain_core.errors import InvalidInputError


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what the domain accepts from anyone."""

    max_message_bytes: int = 4 * 1024 * 1024
    # A proposal's serialized bytes: what every approver reviews and signs. Small and fixed,
    # so that a pending proposal costs little to store, relay and review.
    max_proposal_bytes: int = 64 * 1024
    max_hosts: int = 64
    max_operators: int = 64
    max_changes_per_proposal: int = 64
    max_approvals_per_proposal: int = 128
    max_reason_chars: int = 1024
    max_name_chars: int = 64
    max_clock_skew_seconds: int = 300
    max_states_per_response: int = 100
    max_plaintext_bytes: int = 4096
    max_encryption_context_entries: int = 64
    max_encryption_context_bytes: int = 8192
    max_key_description_chars: int = 8192
    max_policy_grants: int = 64
    max_principals_per_grant: int = 64
    # A key policy's serialized size (AWS KMS caps a key policy at 32 KiB): the policy is
    # carried in every copy of the key's record and parsed into every HSA's key cache.
    max_policy_bytes: int = 32 * 1024
    max_random_bytes: int = 1024
    # The coordinator's quotas. WatchStates streams one host may hold open at a time (a new
    # one replaces its oldest), on top of the coordinator's global cap on streams.
    max_watch_streams_per_host: int = 2
    # Calls from one client address that is not an authenticated HSA of the domain (anyone on
    # the operator port; other identities on the mutual-TLS port): a token bucket refilled at
    # `coordinator_reads_per_second`, holding at most `coordinator_read_burst`. A page of
    # states costs one token per `coordinator_states_per_token` states beyond the first call.
    coordinator_reads_per_second: float = 50.0
    coordinator_read_burst: int = 200
    coordinator_states_per_token: int = 10
    # A page of ListProposals costs one token per `coordinator_proposals_per_token` proposals
    # beyond the first call (each one is parsed and its approvals counted).
    coordinator_proposals_per_token: int = 5
    # Proposals the coordinator keeps pending: in all, and of one proposer, so that one
    # operator cannot fill the store (nor the global cap, blocking the others).
    max_pending_proposals: int = 1000
    max_pending_proposals_per_operator: int = 32
    # Proposals of one proposer the coordinator keeps in any state: beyond it, their oldest
    # closed and expired ones are purged before the retention period ends, so that submitting
    # and cancelling in a loop cannot grow the store.
    max_stored_proposals_per_operator: int = 1000
    # CreateKey per principal, on each HSA process (a token bucket): AWS KMS allows 5 per
    # second per account, with bursts.
    create_key_per_second: float = 5.0
    create_key_burst: int = 50
    # Keys one principal may have created (counted by the coordinator at create, deleted keys
    # not counted): AWS KMS allows 100,000 per account and region.
    max_keys_per_principal: int = 100_000

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC options that enforce the message limit on servers and channels."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]

    def with_overrides(self, overrides: Mapping[str, object], where: str = "limits") -> Limits:
        """These limits with some fields replaced (a config file's `limits` object).

        InvalidInputError for an unknown name, a value of the wrong type, or a value below 1
        (0 for none of them: every limit is a positive bound).
        """
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        values: dict[str, object] = {}
        for name, value in overrides.items():
            kind = kinds.get(name)
            if kind is None:
                raise InvalidInputError(
                    f"{where}: unknown limit {name[:64]!r}; known: {', '.join(sorted(kinds))}"
                )
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
                raise InvalidInputError(f"{where}: {name} must be a whole number, not {value!r}")
            if kind == "float" and not numeric:
                raise InvalidInputError(f"{where}: {name} must be a number, not {value!r}")
            if not numeric or not value > 0:  # type: ignore[operator]
                raise InvalidInputError(f"{where}: {name} must be above 0, not {value!r}")
            values[name] = float(value) if kind == "float" else value  # type: ignore[arg-type]
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]


DEFAULT_LIMITS = Limits()

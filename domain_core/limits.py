"""Every input limit in one place, mirrored in gRPC server and channel options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what the domain accepts from anyone."""

    max_message_bytes: int = 4 * 1024 * 1024
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

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC options that enforce the message limit on servers and channels."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]


DEFAULT_LIMITS = Limits()

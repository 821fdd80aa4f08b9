"""`hsm-operator domain status` and `domain export-state`.

Invariants: what `status` reports about the domain's trust structure (hosts, operators,
quorum, settings, key generation) comes from the head this tool verified from its trust
anchor; the coordinator's own report (its version, registered HSAs and the version each HSA
says it has installed, pending count) is shown beside it, marked as the coordinator's, with
whether it agrees; every line of it is escaped (`display.escape`: host ids, addresses and
warnings the coordinator relays cannot forge lines or drive the terminal). `export-state`
writes only a
verified state, never overwriting a file; that file is what an operator takes to an offline
machine for `sign-offline --state`, and what `--state` pins on a connected one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from domain_core import transition
from domain_core.display import escape
from domain_core.errors import AlreadyExistsError
from domain_core.model import SealedState
from domain_edge.cli import Command, Group
from domain_edge.files import write_new_file
from domain_proto import domain_pb2, services_pb2
from operator_tool._context import CommandContext
from operator_tool._render import (
    HostRow,
    OperatorRow,
    format_duration,
    iso,
    quorum_view,
    settings_view,
    table,
)
from operator_tool._where import add_domain_options, connect

__all__ = ["COMMANDS"]


@dataclass(frozen=True)
class _Status:
    """The verified head beside what the coordinator reports (relayed, unverified)."""

    head: SealedState
    verified_from: str
    coordinator: str
    reported: services_pb2.DomainStatusResponse

    @property
    def manifest(self) -> domain_pb2.Manifest:
        return self.head.manifest.message

    @property
    def registered(self) -> dict[str, str]:
        """Host id: address, of every HSA registered with the coordinator."""
        return {e.host_id: e.address for e in self.reported.hsas}

    @property
    def said(self) -> dict[str, int]:
        """Host id: the version it reports (its own words, relayed)."""
        return {e.host_id: int(e.version) for e in self.reported.hsas}

    @property
    def hosts(self) -> list[HostRow]:
        return [HostRow.of(h) for h in self.manifest.hosts]

    @property
    def operators(self) -> list[OperatorRow]:
        return [OperatorRow.of(o) for o in self.manifest.operators]

    @property
    def agrees(self) -> bool:
        """Whether the coordinator reports the verified head."""
        reported = self.reported
        return reported.version == self.head.version and (
            bytes(reported.state_hash) == self.head.hash
        )

    @property
    def others(self) -> dict[str, str]:
        """Registered HSAs that are not hosts of the verified head."""
        hosts = self.head.manifest.hosts_by_id
        return {h: a for h, a in self.registered.items() if h not in hosts}


def _status_json(status: _Status) -> dict[str, Any]:
    manifest, head, reported = status.manifest, status.head, status.reported
    registered, said = status.registered, status.said
    generation = manifest.key_generations[-1]
    return {
        "domain_id": manifest.domain_id,
        "version": head.version,
        "state_hash": head.hash.hex(),
        "created_at": iso(manifest.created_at),
        "verified_from": status.verified_from,
        "hosts": [
            {
                **row.to_json(),
                "registered": row.host_id in registered,
                "address": registered.get(row.host_id),
                "reported_version": said.get(row.host_id) or None,
            }
            for row in status.hosts
        ],
        "other_registered_hsas": [
            {"host_id": h, "address": a} for h, a in sorted(status.others.items())
        ],
        "operators": [row.to_json() for row in status.operators],
        "quorum": quorum_view(manifest).to_json(),
        "settings": settings_view(manifest.settings),
        "key_generation": {
            "current": generation.generation,
            "created_at": iso(generation.created_at),
            "retained": [g.generation for g in manifest.key_generations],
            "rotation_due_at": iso(transition.rotation_due_at(head.manifest)),
        },
        "coordinator": {
            "address": status.coordinator,
            "version": reported.version,
            "state_hash": bytes(reported.state_hash).hex(),
            "agrees": status.agrees,
            "pending_proposals": reported.pending_proposals,
            # "store behind the HSAs: ..." when HSAs report newer versions (relayed, unverified)
            "store_behind": reported.store_behind,
        },
    }


def _host_lines(status: _Status) -> list[str]:
    registered, said, hosts = status.registered, status.said, status.hosts
    rows = [["HOST", "REGISTERED", "ADDRESS", "REPORTS VERSION", "TLS CERTIFICATE"]] + [
        [
            row.host_id,
            "yes" if row.host_id in registered else "no",
            registered.get(row.host_id, "-"),
            str(said.get(row.host_id) or "-"),
            row.tls_fingerprint[:16],
        ]
        for row in hosts
    ]
    lines = [f"hosts ({len(hosts)}):", *table(rows, indent="  ")]
    others = status.others
    if others:
        lines.append(
            "  registered but not in the domain: "
            + ", ".join(f"{escape(h)} ({escape(a)})" for h, a in sorted(others.items()))
        )
    return lines


def _status_lines(status: _Status) -> list[str]:
    manifest, head, reported = status.manifest, status.head, status.reported
    operators = status.operators
    generation = manifest.key_generations[-1]
    agreement = (
        "agrees"
        if status.agrees
        else f"reports version {reported.version} ({bytes(reported.state_hash).hex()[:16]})"
    )
    settings = manifest.settings
    return [
        f"domain {manifest.domain_id}, version {head.version} (state {head.hash.hex()[:16]}), "
        f"verified from {status.verified_from}",
        f"coordinator {status.coordinator}: {agreement}; "
        f"{reported.pending_proposals} pending proposal(s)",
        *([f"WARNING: {escape(reported.store_behind)}"] if reported.store_behind else []),
        "",
        *_host_lines(status),
        f"operators ({len(operators)}):",
        *table([["NAME", "OPERATOR ID", "ALGORITHM"]] + [r.cells() for r in operators], "  "),
        "quorum:",
        *(f"  {line}" for line in quorum_view(manifest).lines()),
        f"domain key: generation {generation.generation} since {iso(generation.created_at)}; "
        f"scheduled rotation due {iso(transition.rotation_due_at(head.manifest))}",
        "settings: "
        f"key rotation every {format_duration(settings.key_rotation_interval_seconds)}, "
        f"{settings.key_generations_retained} generations kept, proposals live at most "
        f"{format_duration(settings.max_proposal_lifetime_seconds)}",
    ]


def _status(ctx: CommandContext) -> int:
    with connect(ctx) as conn:
        domain = conn.verified()
        reported = conn.client.domain_status()
    status = _Status(domain.head, domain.anchor.source, conn.location.coordinator, reported)
    ctx.emit(_status_json(status), "\n".join(_status_lines(status)))
    return 0


def _export_state(ctx: CommandContext) -> int:
    out = Path(ctx.args.out)
    with connect(ctx) as conn:
        head = conn.verified().head
    try:
        write_new_file(out, head.to_bytes(), 0o644)
    except FileExistsError:
        raise AlreadyExistsError(f"a file exists already at {out}; choose another path") from None
    ctx.emit(
        {
            "out": str(out),
            "domain_id": head.manifest.domain_id,
            "version": head.version,
            "state_hash": head.hash.hex(),
        },
        f"wrote verified version {head.version} of domain {head.manifest.domain_id} "
        f"(state {head.hash.hex()[:16]}) to {out}\n"
        f"take it to your offline machine for `hsm-operator sign-offline FILE --state {out}`",
    )
    return 0


def _export_state_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="FILE", help="file to create")
    add_domain_options(parser)


COMMANDS: Final = (
    Group(
        "domain",
        help="the domain's verified state: hosts, operators, quorum",
        description="Read the domain's state, verified from your trust anchor.",
        example="hsm-operator domain status --cluster hsm-cluster",
        commands=(
            Command(
                "status",
                help="show the verified head: hosts, operators, quorum, settings, domain key",
                description="Verify the coordinator's chain from your trust anchor and show the "
                "head: hosts (and whether each is registered with the coordinator), operators, "
                "quorum, settings and domain key generation, with the coordinator's own report "
                "beside it.",
                run=_status,
                example="hsm-operator domain status --cluster hsm-cluster --json",
                arguments=add_domain_options,
            ),
            Command(
                "export-state",
                help="write the verified head state to a file (for sign-offline --state)",
                description="Write the head state, verified from your trust anchor, to a new "
                "file: take it to an air-gapped machine for `sign-offline --state`, or pin it "
                "with --state.",
                run=_export_state,
                example="hsm-operator domain export-state --out v5.state --cluster hsm-cluster",
                arguments=_export_state_arguments,
            ),
        ),
    ),
)

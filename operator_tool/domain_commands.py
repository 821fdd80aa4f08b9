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
from pathlib import Path
from typing import Any, Final

from domain_core import transition
from domain_core.display import escape
from domain_core.errors import AlreadyExistsError
from domain_edge.cli import Command, Group
from domain_edge.files import write_new_file
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


def _status(ctx: CommandContext) -> int:
    with connect(ctx) as conn:
        domain = conn.verified()
        reported = conn.client.domain_status()
    head = domain.head
    manifest = head.manifest.message
    registered = {e.host_id: e.address for e in reported.hsas}
    said = {e.host_id: int(e.version) for e in reported.hsas}  # self-reports, relayed
    hosts = [HostRow.of(h) for h in manifest.hosts]
    operators = [OperatorRow.of(o) for o in manifest.operators]
    quorum = quorum_view(manifest)
    generation = manifest.key_generations[-1]
    rotation_due = transition.rotation_due_at(head.manifest)
    agrees = reported.version == head.version and bytes(reported.state_hash) == head.hash
    others = {h: a for h, a in registered.items() if h not in head.manifest.hosts_by_id}
    document: dict[str, Any] = {
        "domain_id": manifest.domain_id,
        "version": head.version,
        "state_hash": head.hash.hex(),
        "created_at": iso(manifest.created_at),
        "verified_from": domain.anchor.source,
        "hosts": [
            {
                **row.to_json(),
                "registered": row.host_id in registered,
                "address": registered.get(row.host_id),
                "reported_version": said.get(row.host_id) or None,
            }
            for row in hosts
        ],
        "other_registered_hsas": [{"host_id": h, "address": a} for h, a in sorted(others.items())],
        "operators": [row.to_json() for row in operators],
        "quorum": quorum.to_json(),
        "settings": settings_view(manifest.settings),
        "key_generation": {
            "current": generation.generation,
            "created_at": iso(generation.created_at),
            "retained": [g.generation for g in manifest.key_generations],
            "rotation_due_at": iso(rotation_due),
        },
        "coordinator": {
            "address": conn.location.coordinator,
            "version": reported.version,
            "state_hash": bytes(reported.state_hash).hex(),
            "agrees": agrees,
            "pending_proposals": reported.pending_proposals,
            # "store behind the HSAs: ..." when HSAs report newer versions (relayed, unverified)
            "store_behind": reported.store_behind,
        },
    }
    agreement = (
        "agrees"
        if agrees
        else f"reports version {reported.version} ({bytes(reported.state_hash).hex()[:16]})"
    )
    lines = [
        f"domain {manifest.domain_id}, version {head.version} (state {head.hash.hex()[:16]}), "
        f"verified from {domain.anchor.source}",
        f"coordinator {conn.location.coordinator}: {agreement}; "
        f"{reported.pending_proposals} pending proposal(s)",
        *([f"WARNING: {escape(reported.store_behind)}"] if reported.store_behind else []),
        "",
        f"hosts ({len(hosts)}):",
        *table(
            [["HOST", "REGISTERED", "ADDRESS", "REPORTS VERSION", "TLS CERTIFICATE"]]
            + [
                [
                    row.host_id,
                    "yes" if row.host_id in registered else "no",
                    registered.get(row.host_id, "-"),
                    str(said.get(row.host_id) or "-"),
                    row.tls_fingerprint[:16],
                ]
                for row in hosts
            ],
            indent="  ",
        ),
    ]
    if others:
        lines.append(
            "  registered but not in the domain: "
            + ", ".join(f"{escape(h)} ({escape(a)})" for h, a in sorted(others.items()))
        )
    lines += [
        f"operators ({len(operators)}):",
        *table([["NAME", "OPERATOR ID", "ALGORITHM"]] + [r.cells() for r in operators], "  "),
        "quorum:",
        *(f"  {line}" for line in quorum.lines()),
        f"domain key: generation {generation.generation} since {iso(generation.created_at)}; "
        f"scheduled rotation due {iso(rotation_due)}",
        "settings: "
        f"key rotation every {format_duration(manifest.settings.key_rotation_interval_seconds)}, "
        f"{manifest.settings.key_generations_retained} generations kept, proposals live at most "
        f"{format_duration(manifest.settings.max_proposal_lifetime_seconds)}",
    ]
    ctx.emit(document, "\n".join(lines))
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

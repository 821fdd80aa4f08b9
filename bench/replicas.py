"""Coordinator replicas on etcd: CreateKey against SQLite, propagation, and failover.

Two domains of three HSAs run side by side for the whole benchmark: one with a single
coordinator on SQLite, one with three coordinator replicas on a three-member etcd cluster of
the system's `etcd` (`hsm-domain init --coordinators 3`, the same processes `hsm-domain up`
starts). Figures, issue 15 item 6:

1. Propagation (first, while the domains hold no key records): rotate-domain-key changes, from
   the final approval to every HSA running the new version, on each domain (as
   `bench.propagation`): `propagation_<store>_3_nodes_*`.
2. CreateKey (each one a key record stored at the coordinator: an fsync'd SQLite transaction,
   or a compare-and-swap etcd transaction committed by a majority of members) through raw
   stubs round robin over the three HSAs, 1 and 16 callers, the two stores alternating round
   by round: `create_key_<store>_c<N>_ops_s`, `_p50_ms`, `_p99_ms`, and the CPU per CreateKey
   of the coordinator replicas (`..._coordinator_cpu_us_per_op`, all of them together) and of
   the etcd members (`..._etcd_cpu_us_per_op`).
3. Failover, repeated: kill -9 of the leading replica, then at once and in parallel a quorum
   change (a set-settings, proposed and approved through one operator client made before,
   given every replica's address) and a CreateKey (through a `KeyClient` made before):
   seconds from the kill to each one's success (`failover_quorum_change_s_*`,
   `failover_create_key_s_*`) and to another replica leading (`failover_new_leader_s_*`,
   bounded by the election lease). The killed replica is started again between repetitions.

Quick mode: one round of 1 s per cell, 5 changes, one failover. The etcd members, replicas and
HSAs all share this machine's cores with the client: compare figures of one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import grpc

from bench._cluster import BenchDomain, apply_change
from bench._core import BenchConfig, BenchError, Figure
from bench._load import LoadResult, round_robin, run_threads
from bench._proc import CpuSample, per_op_us, tree_pids
from bench._stats import median
from bench.propagation import follow_changes
from domain_core.changes import set_settings
from domain_core.errors import HsmDomainError
from domain_edge.kms_client import KeyClient
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "replicas"
TITLE: Final = "coordinator replicas on etcd: CreateKey vs SQLite, propagation, failover"

STORES: Final = ("sqlite", "etcd")
CONCURRENCIES: Final = (1, 16)
MAX_CREATES: Final = 5_000
CALL_TIMEOUT: Final = 10.0
FAILOVER_TIMEOUT: Final = 60.0
LEADER_POLL_SECONDS: Final = 0.05
SETTLE_SECONDS: Final = 1.0

__all__ = ["NAME", "TITLE", "main", "measure_create_keys", "measure_failover", "run"]


@contextmanager
def _domains(config: BenchConfig) -> Iterator[dict[str, BenchDomain]]:
    """Both domains, started one after the other, stopped whatever happens."""
    with ExitStack() as stack:
        started: dict[str, BenchDomain] = {}
        for store in STORES:
            coordinators = 3 if store == "etcd" else 1
            config.log(f"   starting a domain of 3 HSAs, {coordinators} coordinator(s) on {store}")
            domain = BenchDomain(
                config.directory(f"replicas-{store}"),
                nodes=3,
                coordinators=coordinators,
                store=store,
                start_timeout=120.0,
            )
            started[store] = stack.enter_context(domain)
        yield started


class _StoreMeter:
    """CPU seconds of the coordinator replicas and of the etcd members (each with its
    children) over a measured window: `start()`, `stop()`, then `seconds[kind]`."""

    def __init__(self, domain: BenchDomain) -> None:
        groups = {"coordinator": domain.layout.coordinators, "etcd": domain.layout.etcd_members}
        self._samples = {
            kind: [
                CpuSample(pid)
                for name in names
                if domain.is_running(name)
                for pid in tree_pids(domain.pid(name))
            ]
            for kind, names in groups.items()
        }

    def start(self) -> None:
        for samples in self._samples.values():
            for sample in samples:
                sample.start()

    def stop(self) -> None:
        for samples in self._samples.values():
            for sample in samples:
                sample.stop()

    @property
    def seconds(self) -> dict[str, float]:
        return {kind: sum(s.seconds for s in samples) for kind, samples in self._samples.items()}


def _create_key_call(domain: BenchDomain, stack: ExitStack) -> Callable[[], object]:
    """CreateKey on the next of the domain's HSAs in turn (raw stubs, as `bench.keyservice`)."""
    methods = []
    for host in domain.hosts:
        channel = stack.enter_context(domain.node_channel(host))
        stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        methods.append(stub.CreateKey)
    request = services_pb2.CreateKeyRequest(description="bench replicas create")
    return round_robin(methods, request, CALL_TIMEOUT)


def measure_create_keys(
    config: BenchConfig, domains: dict[str, BenchDomain], *, rounds: int, duration: float
) -> dict[str, Figure]:
    """CreateKey on each store at each concurrency, the stores alternating round by round."""
    results: dict[tuple[str, int], list[LoadResult]] = {}
    cpu: dict[tuple[str, int, str], float] = {}
    with ExitStack() as stack:
        calls = {store: _create_key_call(domain, stack) for store, domain in domains.items()}
        for round_index in range(rounds):
            for concurrency in CONCURRENCIES:
                for store, domain in domains.items():
                    meter = _StoreMeter(domain)
                    result = run_threads(
                        calls[store],
                        concurrency=concurrency,
                        duration=duration,
                        max_ops=MAX_CREATES,
                        warmup=0.2,
                        on_start=meter.start,
                        on_stop=meter.stop,
                    )
                    if result.errors:
                        raise BenchError(
                            f"CreateKey on {store} failed {result.errors} times: "
                            f"{result.first_error}"
                        )
                    results.setdefault((store, concurrency), []).append(result)
                    for kind, seconds in meter.seconds.items():
                        key = (store, concurrency, kind)
                        cpu[key] = cpu.get(key, 0.0) + seconds
                    config.log(
                        f"   round {round_index + 1}: CreateKey on {store}, {concurrency} "
                        f"caller(s): {result.ops_per_second:,.0f}/s"
                    )
                    time.sleep(SETTLE_SECONDS)  # the last writes' fsyncs settle
    figures: dict[str, Figure] = {}
    for (store, concurrency), found in results.items():
        merged = LoadResult(concurrency=concurrency)
        for result in found:
            merged.latencies_ns.extend(result.latencies_ns)
            merged.elapsed += result.elapsed
        prefix = f"create_key_{store}_c{concurrency}"
        figures.update(merged.figures(prefix))
        for kind in ("coordinator", "etcd"):
            if store == "etcd" or kind == "coordinator":
                figures[f"{prefix}_{kind}_cpu_us_per_op"] = per_op_us(
                    cpu[(store, concurrency, kind)], merged.operations
                )
        config.add_samples(
            "replicas_create_key",
            f"{store} c{concurrency}",
            [v / 1e6 for v in merged.latencies_ns],
        )
    for concurrency in CONCURRENCIES:
        sqlite = figures.get(f"create_key_sqlite_c{concurrency}_ops_s")
        etcd = figures.get(f"create_key_etcd_c{concurrency}_ops_s")
        if isinstance(sqlite, float) and isinstance(etcd, float) and sqlite > 0:
            figures[f"create_key_etcd_over_sqlite_c{concurrency}"] = etcd / sqlite
    return figures


def _wait_leader(domain: BenchDomain, other_than: str = "", timeout: float = 60.0) -> str:
    """The replica that leads, once one other than `other_than` does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            leader = domain.leader()
        except HsmDomainError:
            leader = ""
        if leader and leader != other_than:
            return leader
        if time.monotonic() > deadline:
            raise BenchError(f"no replica other than {other_than or 'none'} leads in {timeout} s")
        time.sleep(LEADER_POLL_SECONDS)


def _settings_change(domain: BenchDomain) -> None:
    """A quorum change that costs the HSAs nothing beyond the change itself (unlike a domain
    key rotation, which re-wraps every key record): the retained generations, toggled."""
    settings = domain.coordinator_client().latest_state().manifest.message.settings
    retained = 9 if settings.key_generations_retained != 9 else 8
    apply_change(domain, [set_settings(base=settings, key_generations_retained=retained)])


def _led_after(domain: BenchDomain, killed: str) -> tuple[str, float]:
    """The replica that leads after `killed`, and when (monotonic) it was first seen leading."""
    return _wait_leader(domain, killed), time.monotonic()


def _until_ok(action: Callable[[], object], began: float) -> float:
    """Seconds from `began` until `action` succeeds, trying again after each failure (an
    application that retries), bounded by FAILOVER_TIMEOUT."""
    last: BaseException | None = None
    while time.monotonic() - began < FAILOVER_TIMEOUT:
        try:
            action()
        except (grpc.RpcError, HsmDomainError) as error:
            last = error
            time.sleep(0.05)
            continue
        return time.monotonic() - began
    raise BenchError(f"still failing {FAILOVER_TIMEOUT} s after the leader's kill: {last}")


def measure_failover(
    config: BenchConfig, domain: BenchDomain, *, repeats: int
) -> dict[str, Figure]:
    """Kill -9 the leader `repeats` times; seconds to a quorum change, a CreateKey and a new
    leader, each from the kill."""
    tls = domain.client_tls()
    changes: list[float] = []
    creates: list[float] = []
    leads: list[float] = []
    with KeyClient(
        list(domain.node_addresses().values()),
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=CALL_TIMEOUT,
    ) as keys:
        operators = domain.coordinator_client()
        operators.latest_state()  # both clients connected before the kill
        keys.create_key("bench replicas failover warm-up")
        for index in range(repeats):
            leader = _wait_leader(domain)
            began = time.monotonic()
            domain.kill(leader)
            with ThreadPoolExecutor(max_workers=3) as pool:
                change = pool.submit(_until_ok, lambda: _settings_change(domain), began)
                create = pool.submit(
                    _until_ok, lambda: keys.create_key("bench replicas failover"), began
                )
                successor = pool.submit(_led_after, domain, leader)
                changes.append(change.result())
                creates.append(create.result())
                new_leader, led_at = successor.result()
                leads.append(led_at - began)
            config.log(
                f"   failover {index + 1}: kill -9 of {leader}; quorum change after "
                f"{changes[-1]:.2f} s, CreateKey after {creates[-1]:.2f} s, {new_leader} "
                f"leads after {leads[-1]:.2f} s"
            )
            domain.start_coordinator(leader)
            domain.wait_converged()
            time.sleep(SETTLE_SECONDS)
    figures: dict[str, Figure] = {"failover_repeats": repeats}
    for name, values in (
        ("quorum_change", changes),
        ("create_key", creates),
        ("new_leader", leads),
    ):
        figures[f"failover_{name}_s_median"] = median(values)
        figures[f"failover_{name}_s_max"] = max(values)
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """CreateKey on both stores, propagation on both, failover on etcd."""
    if shutil.which("etcd") is None:
        raise BenchError("the etcd binary is missing: apt-get install etcd-server")
    rounds = int(config.pick(1, 3))
    duration = float(config.pick(1.0, 3.0))
    changes = int(config.pick(5, 20))
    repeats = int(config.pick(1, 3))
    figures: dict[str, Figure] = {}
    with _domains(config) as domains:
        # Propagation first, on domains without key records: a domain key rotation on a
        # domain with thousands of keys waits for their re-wrap, which is not propagation.
        for store, domain in domains.items():
            followed = follow_changes(domain, changes)
            figures.update(followed.figures(domain, f"propagation_{store}_3_nodes"))
            config.add_samples("replicas_propagation", store, followed.totals)
            config.log(
                f"   propagation on {store}: median {median(followed.totals):.1f} ms over "
                f"{changes} changes"
            )
        figures.update(measure_create_keys(config, domains, rounds=rounds, duration=duration))
        figures.update(measure_failover(config, domains["etcd"], repeats=repeats))
    return figures


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.replicas [--quick] [--json FILE]`: run this benchmark alone."""
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=TITLE)
    parser.add_argument("--quick", action="store_true", help="short runs, one failover")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            print(line, file=sys.stderr, flush=True)

    try:
        figures = run(BenchConfig(quick=args.quick, work_dir=work, log=log))
    except BenchError as error:
        print(f"bench.replicas: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key, value in figures.items():
        print(f"{key:48} {value:.3f}" if isinstance(value, float) else f"{key:48} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

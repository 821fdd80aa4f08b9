"""Memory: resident size (VmRSS) of an HSA idle, under Echo load, after it, and with 100,000
keys' tokens cached.

A fresh one-node domain; readings from /proc (`bench._proc`):
- `memory_hsa_idle_rss_mib`: one second after the node is healthy;
- `memory_hsa_load_rss_mib`: the largest reading while 16 asyncio callers send 1 KiB Echo
  calls (sampled every 20 ms), and `memory_hsa_load_hwm_mib` its peak (VmHWM) after the load;
- `memory_hsa_after_load_rss_mib`: one second after the load stopped (what it keeps);
- `memory_coordinator_idle_rss_mib`: the coordinator, for comparison;
- with keys cached: 100,000 key records (3,000 in quick mode; the HSA's cache holds up to
  `memory_cache_max_entries`) are stored through the coordinator's PutKey as the HSA's own
  identity (`bench.rewrap.create_records`: one backing key each, sealed under the domain key;
  not timed against the HSA), then the demo application calls DescribeKey once per key (16
  asyncio callers), which makes the HSA fetch, verify and cache each record. One second later
  `memory_hsa_cached_rss_mib` is read, and `memory_cache_per_key_bytes` = (that reading - the
  reading just before the DescribeKey calls) / keys cached. `memory_cache_fill_keys_per_s` is the
  rate of those first (cold) reads and `memory_cache_fill_hsa_cpu_us_per_op` (and
  `..._coordinator_cpu_us_per_op`) what each cost the HSA (fetch, verify, version floor, audit)
  and the coordinator (GetKey), read by `bench._proc.CpuMeter` over the calls;
  `memory_coordinator_keys_rss_mib` is the coordinator holding every record.
Load lasts 5 s (1.5 s in quick mode). Filling the cache is bounded in time (10 minutes, 90 s
in quick mode): `memory_cache_keys` says how many keys were cached when it stopped.

Keys with the largest policy there could be before policies were capped (issue 21 item 7: 64
grants of 64 principals with 60-character names, 333 KB, and an 8 KiB description), in a
second fresh domain whose HSA has a key cache budget of `memory_maxpolicy_cache_budget_mib`
(its default, 512 MiB; 32 MiB in quick mode): `memory_maxpolicy_keys` such records (800; 60 in
quick mode: about 2.5 times the budget by the cache's estimate) are stored through PutKey as
above (the coordinator keeps what an HSA signed; CreateKey refuses such policies now), then
described once each, one caller. `memory_maxpolicy_record_bytes` is one record's size;
`memory_maxpolicy_per_key_bytes` the growth per key over the first keys (a tenth of the budget's
worth); `memory_hsa_maxpolicy_rss_mib` the resident size after every key was described and
`memory_maxpolicy_growth_mib` its growth over `memory_hsa_maxpolicy_before_rss_mib`: bounded by
the budget (plus what the allocator keeps), where 800 such keys cost 2 GB before the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure
from bench._load import aio_mtls_channel
from bench._proc import CpuMeter, memory_kib, per_op_us, rss_mib
from bench.floor import PAYLOAD_BYTES, echo_run
from bench.rewrap import create_records, load_host
from deploy.init import COORDINATOR_NAME, DomainLayout
from domain_edge.config import NodeConfig
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc
from hsa_node.keycache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES

NAME: Final = "memory"
TITLE: Final = "HSA resident memory: idle, under Echo load (c16), after, with 100,000 keys cached"

SETTLE_SECONDS: Final = 1.0
SAMPLE_INTERVAL: Final = 0.02
LOAD_CONCURRENCY: Final = 16
CACHE_CONCURRENCY: Final = 16
CALL_TIMEOUT: Final = 30.0
MIB: Final = 1024 * 1024

__all__ = ["NAME", "TITLE", "fill_cache", "run"]


def fill_cache(
    domain: BenchDomain,
    host: str,
    key_ids: Sequence[str],
    budget: float,
    concurrency: int = CACHE_CONCURRENCY,
) -> int:
    """DescribeKey every key once on `host` (16 asyncio callers, or `concurrency`, one channel)
    until done or `budget` seconds have passed; how many calls succeeded."""
    address, tls = domain.address(host), domain.client_tls()
    deadline = time.monotonic() + budget
    pending = iter(key_ids)
    described = [0]
    failures: list[str] = []

    async def main() -> None:
        async with aio_mtls_channel(address, tls) as channel:
            stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]

            async def caller() -> None:
                for key_id in pending:
                    if time.monotonic() > deadline or len(failures) > 100:
                        return
                    try:
                        await stub.DescribeKey(
                            services_pb2.KeyIdRequest(key_id=key_id), timeout=CALL_TIMEOUT
                        )
                    except Exception as error:
                        failures.append(f"{type(error).__name__}: {str(error)[:200]}")
                        continue
                    described[0] += 1

            await asyncio.gather(*(caller() for _ in range(concurrency)))

    asyncio.run(main())
    if failures and not described[0]:
        raise RuntimeError(f"no DescribeKey call succeeded: {failures[0]}")
    return described[0]


def _cache_figures(config: BenchConfig, domain: BenchDomain, host: str) -> dict[str, Figure]:
    keys = int(config.pick(3_000, 100_000))
    budget = float(config.pick(90.0, 600.0))
    pid = domain.pid(host)
    config.log(f"   storing {keys:,} key records through the coordinator's PutKey...")
    began = time.perf_counter()
    key_ids = create_records(
        domain.layout, domain.address(COORDINATOR_NAME), load_host(domain.layout, host), keys
    )
    created = time.perf_counter() - began
    time.sleep(SETTLE_SECONDS)
    before = rss_mib(pid)
    config.log(f"   DescribeKey of each key on {host} (fills its key cache)...")
    meter = CpuMeter([pid], coordinator=domain.pid(COORDINATOR_NAME))
    meter.start()
    began = time.perf_counter()
    cached = fill_cache(domain, host, key_ids, budget)
    filled = time.perf_counter() - began
    meter.stop()
    time.sleep(SETTLE_SECONDS)
    after = rss_mib(pid)
    return {
        "memory_cache_keys": cached,
        "memory_cache_max_entries": DEFAULT_MAX_ENTRIES,
        "memory_cache_create_keys_per_s": keys / created,
        "memory_cache_fill_keys_per_s": cached / filled,
        "memory_cache_fill_hsa_cpu_us_per_op": per_op_us(meter.hsa_seconds, cached),
        "memory_cache_fill_coordinator_cpu_us_per_op": per_op_us(meter.coordinator_seconds, cached),
        "memory_hsa_before_cache_rss_mib": before,
        "memory_hsa_cached_rss_mib": after,
        "memory_cache_per_key_bytes": (after - before) * MIB / cached if cached else float("nan"),
        "memory_coordinator_keys_rss_mib": rss_mib(domain.pid(COORDINATOR_NAME)),
    }


class _BudgetDomain(BenchDomain):
    """A BenchDomain whose HSAs' key caches have a budget of `cache_mib`."""

    def __init__(self, directory: Path, *, cache_mib: int) -> None:
        super().__init__(directory, nodes=1)
        self._cache_mib = cache_mib

    def init(self) -> DomainLayout:
        layout = super().init()
        for path in layout.node_configs.values():
            config = NodeConfig.load(path)
            dataclasses.replace(config, key_cache_mib=self._cache_mib).save(path)
        return layout


def _maximal_grants() -> list[keys_pb2.PolicyGrant]:
    """63 grants of 64 principals with 60-character names: with the creator's own grant, the
    most the count limits allowed before the 32 KiB cap (333 KB)."""
    grants = []
    for number in range(63):
        principals = [
            f"spiffe://local/client/{'p' * 50}{number * 64 + index:010d}" for index in range(64)
        ]
        grants.append(
            keys_pb2.PolicyGrant(
                principals=principals,
                operations=[keys_pb2.KEY_OPERATION_DESCRIBE],
            )
        )
    return grants


def _maximal_policy_figures(config: BenchConfig) -> dict[str, Figure]:
    """The figures of the keys with maximal policies (see the module docstring)."""
    budget_mib = int(config.pick(32, DEFAULT_MAX_BYTES // MIB))
    keys = int(config.pick(60, 800))
    with _BudgetDomain(config.directory("memory-maxpolicy"), cache_mib=budget_mib) as domain:
        host = domain.hosts[0]
        pid = domain.pid(host)
        config.log(f"   storing {keys} key records with 333 KB policies through PutKey...")
        key_ids = create_records(
            domain.layout,
            domain.address(COORDINATOR_NAME),
            load_host(domain.layout, host),
            keys,
            extra_grants=_maximal_grants(),
            description="d" * 8192,
            threads=4,
        )
        time.sleep(SETTLE_SECONDS)
        before = rss_mib(pid)
        first = max(1, int(budget_mib * MIB / 10 / 1_600_000))
        config.log(f"   DescribeKey of each on {host} (cache budget {budget_mib} MiB)...")
        described = fill_cache(domain, host, key_ids[:first], 300.0, concurrency=1)
        time.sleep(SETTLE_SECONDS)
        after_first = rss_mib(pid)
        described += fill_cache(domain, host, key_ids[first:], 900.0, concurrency=1)
        time.sleep(SETTLE_SECONDS)
        after = rss_mib(pid)
        record_bytes = _stored_record_bytes(domain, key_ids[0])
    return {
        "memory_maxpolicy_keys": described,
        "memory_maxpolicy_record_bytes": record_bytes,
        "memory_maxpolicy_cache_budget_mib": budget_mib,
        "memory_hsa_maxpolicy_before_rss_mib": before,
        "memory_maxpolicy_per_key_bytes": (after_first - before) * MIB / first,
        "memory_hsa_maxpolicy_rss_mib": after,
        "memory_maxpolicy_growth_mib": after - before,
    }


def _stored_record_bytes(domain: BenchDomain, key_id: str) -> int:
    """The size of the record the coordinator stores for `key_id` (read from its database)."""
    path = domain.layout.coordinator_config.parent / "coordinator.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT length(record) FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    return int(row[0]) if row is not None else 0


def run(config: BenchConfig) -> dict[str, Figure]:
    """Resident memory of a fresh HSA before, during and after load, then with keys cached."""
    duration = float(config.pick(1.5, 5.0))
    figures: dict[str, Figure] = {}
    with BenchDomain(config.directory("memory"), nodes=1) as domain:
        host = domain.hosts[0]
        pid = domain.pid(host)
        time.sleep(SETTLE_SECONDS)
        figures["memory_hsa_idle_rss_mib"] = rss_mib(pid)
        figures["memory_coordinator_idle_rss_mib"] = rss_mib(domain.pid(COORDINATOR_NAME))

        readings: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_INTERVAL):
                readings.append(rss_mib(pid))

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        try:
            result = echo_run(
                domain,
                host,
                client="async",
                concurrency=LOAD_CONCURRENCY,
                duration=duration,
                payload=os.urandom(PAYLOAD_BYTES),
            )
        finally:
            stop.set()
            sampler.join(timeout=5.0)
        figures["memory_load_ops"] = result.load.operations
        figures["memory_hsa_load_rss_mib"] = max(readings) if readings else rss_mib(pid)
        figures["memory_hsa_load_hwm_mib"] = memory_kib(pid)["VmHWM"] / 1024.0
        time.sleep(SETTLE_SECONDS)
        figures["memory_hsa_after_load_rss_mib"] = rss_mib(pid)
        figures.update(_cache_figures(config, domain, host))
    figures["memory_cache_max_bytes_mib"] = DEFAULT_MAX_BYTES / MIB
    figures.update(_maximal_policy_figures(config))
    return figures

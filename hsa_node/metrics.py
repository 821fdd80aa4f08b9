"""The gauges an HSA exports with its metrics (`domain_edge.metrics`), read when scraped.

What the domain looks like from this host (the verified version, membership, the domain key
generation), how long since a peer confirmed its head, how far behind the coordinator it is,
the key upkeep's re-wrap passes, its key cache (entries, bytes, lookups, hit ratio) and its
audit log (records written, records not yet covered by a
durable signed checkpoint). Counts and versions only: no key id, no principal, nothing secret.
"""

from __future__ import annotations

from collections.abc import Iterator

from domain_edge.metrics import Gauge
from hsa_node.keyhost import KeyServiceHost
from hsa_node.node import DomainNode
from hsa_node.peering import Peering
from hsa_node.sync import Syncer

__all__ = ["hsa_gauges"]


def hsa_gauges(
    node: DomainNode, keys: KeyServiceHost, peering: Peering, syncer: Syncer
) -> Iterator[Gauge]:
    """This HSA's gauges now."""
    status = node.status()
    yield Gauge("hsm_domain_version", "Version of the verified head", status.version)
    yield Gauge(
        "hsm_domain_key_generation", "Current domain key generation", status.domain_key_generation
    )
    yield Gauge("hsm_domain_member", "1 if the head lists this host", float(status.member))
    yield Gauge("hsm_hsa_healthy", "1 if this HSA serves", float(status.healthy))
    yield Gauge(
        "hsm_head_unconfirmed_seconds",
        "Seconds since a peer last confirmed this host's head",
        peering.unconfirmed_for(),
    )
    lag, since = syncer.coordinator_lag()
    yield Gauge(
        "hsm_sync_lag_versions",
        "Versions the coordinator was seen to hold beyond this host's head",
        lag,
    )
    if since is not None:
        yield Gauge(
            "hsm_coordinator_answered_seconds",
            "Seconds since the coordinator last answered this host's pull",
            since,
        )
    yield from rewrap_gauges(keys)
    yield from key_service_gauges(keys)


def rewrap_gauges(keys: KeyServiceHost) -> Iterator[Gauge]:
    """The key upkeep (re-wrap after a domain key rotation): the pass running, the last one
    finished (zeros while there is none, so every series exists from the start)."""
    if keys.maintainer is None:
        return
    running, last = keys.maintainer.progress()
    yield Gauge("hsm_rewrap_running", "1 while a re-wrap pass runs", float(running is not None))
    yield Gauge(
        "hsm_rewrap_scanned",
        "Records scanned by the running re-wrap pass",
        running.scanned if running is not None else 0,
    )
    yield Gauge(
        "hsm_rewrap_rewrapped",
        "Records re-wrapped by the running pass",
        running.rewrapped if running is not None else 0,
    )
    yield Gauge(
        "hsm_rewrap_last_pass_rewrapped",
        "Records the last finished re-wrap pass re-wrapped",
        last.rewrapped if last is not None else 0,
    )
    yield Gauge(
        "hsm_rewrap_last_pass_failed",
        "Records the last finished pass could not move",
        last.failed if last is not None else 0,
    )
    yield Gauge(
        "hsm_rewrap_last_pass_generation",
        "Domain key generation the last finished pass re-wrapped to (0: none yet)",
        last.generation if last is not None else 0,
    )


def key_service_gauges(keys: KeyServiceHost) -> Iterator[Gauge]:
    """The key cache and the audit log of this key service process (an HSA's, a worker's)."""
    seq = keys.audit.seq
    head = keys.audit.latest_head
    yield Gauge("hsm_audit_records", "Records written to this process's audit log", seq)
    yield Gauge(
        "hsm_audit_unchecked_records",
        "Records after the newest durable signed checkpoint",
        seq - (head.seq if head is not None else 0),
    )
    cache = keys.cache
    hits, lookups = cache.lookups()
    yield Gauge("hsm_key_cache_entries", "Keys held verified in the cache", len(cache))
    yield Gauge("hsm_key_cache_bytes", "Estimated memory of the cached keys", cache.cached_bytes)
    yield Gauge("hsm_key_cache_lookups", "Key lookups since the start", lookups)
    yield Gauge(
        "hsm_key_cache_hit_ratio",
        "Share of lookups served from the cache since the start",
        hits / lookups if lookups else 0.0,
    )

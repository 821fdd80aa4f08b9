"""Re-wrapping key records after a domain key rotation: how long 10,000 keys take.

Two measurements, each in a fresh local domain with a real coordinator process:

- `inprocess`: one HSA's key upkeep (`hsa_node.rewrap.KeyMaintainer.run_pass`) runs in this
  process, as hsa-1, after a quorum-approved domain key rotation that hsa-1 sealed and
  installed in this process. It measures the pipeline alone: page through ListKeyRecords,
  verify every record, re-wrap its tokens, put it back with a compare-and-swap, over mutual
  TLS, with no pause between pages and no other HSA.
- `cluster`: three HSA processes; after a quorum-approved rotate-domain-key through the
  coordinator, the time from the final approval until every record is under the new
  generation, as the HSAs' background loops do it together (each starts a pass when it sees
  the new generation, at a random key, so they share the work; lost compare-and-swaps are
  reported per HSA from their logs).

Key records are made directly in this process (a random backing key sealed under domain key
generation 1 with hsa-1's domain keys) and stored through the coordinator's PutKey as hsa-1,
16 calls at a time; that setup is not timed.

    python -m bench.rewrap                       # 10,000 keys, both measurements
    python -m bench.rewrap --keys 1000 --mode inprocess --json rewrap.json

It is also a module of the `python -m bench` runner (NAME, TITLE, run).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import grpc

from bench._cluster import FAST_SCRYPT_N, BenchDomain, apply_change
from bench._core import BenchConfig, Figure
from deploy import cluster as runner
from deploy.init import DomainLayout, init_domain, read_passphrase
from domain_core import changes, crypto, keytokens, policy, quorum
from domain_core.ciphertext import new_key_id
from domain_core.model import Proposal, SealedState
from domain_edge import transport
from domain_edge.config import NodeConfig
from domain_edge.file_tokens import load_file_token
from domain_edge.identity_files import TLS_CERTIFICATE_FILE, TLS_KEY_FILE
from domain_edge.layout import DEMO_CLIENT
from domain_edge.transport import CertificatePeerContext, TlsMaterial
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc
from hsa_node.keycache import KeyCache
from hsa_node.keyfloors import FLOOR_FILE, MetadataVersionFloor
from hsa_node.keyrecords import KeyRecordClient
from hsa_node.rewrap import DEFAULT_PAGE_SIZE, KeyMaintainer
from hsa_node.server import LoadedNode, load_node
from hsa_node.servicers import CoordinatorPin, HsaAdminServicer

NAME: Final = "rewrap"
TITLE: Final = "re-wrap of 10,000 key records after a domain key rotation (quick: 1,000)"

__all__ = [
    "NAME",
    "TITLE",
    "create_records",
    "host_tls",
    "load_host",
    "main",
    "measure_cluster",
    "measure_inprocess",
    "run",
]

DEFAULT_KEYS: Final = 10_000
PUT_THREADS: Final = 16
CALL_TIMEOUT: Final = 10.0
POLL_SECONDS: Final = 0.5
CLUSTER_TIMEOUT: Final = 900.0
_PASS_LINE: Final = re.compile(
    r"key pass done in [0-9.]+ s: (?:shard|takeover) pass: scanned \d+, re-wrapped "
    r"(?P<rewrapped>\d+) to domain key generation (?P<generation>\d+), rotated \d+, deleted \d+, "
    r"(?P<conflicts>\d+) lost to concurrent"
)


def host_tls(layout: DomainLayout, host: str) -> TlsMaterial:
    """The TLS identity of HSA `host` (to call the coordinator as that host)."""
    identity = layout.node_identity_dir(host)
    return TlsMaterial.from_files(
        layout.ca_cert, identity / TLS_CERTIFICATE_FILE, identity / TLS_KEY_FILE
    )


def load_host(layout: DomainLayout, host: str) -> LoadedNode:
    """HSA `host` loaded in this process from its files (its domain keys, read-only use)."""
    return load_node(NodeConfig.load(layout.node_configs[host]))


def create_records(
    layout: DomainLayout,
    coordinator: str,
    loaded: LoadedNode,
    count: int,
    *,
    extra_grants: Sequence[keys_pb2.PolicyGrant] = (),
    description: str = "",
    threads: int = 0,
) -> list[str]:
    """Store `count` fresh key records through PutKey as `loaded`'s host, 16 calls at a time
    (or `threads`); their key ids. Each record is sealed here under the current domain key
    generation, with the demo application as creator (so its default policy lets it use the
    key), and `extra_grants` and `description` if given (the coordinator stores what an HSA
    signed: records with policies beyond today's limits, as written before them)."""
    keys = loaded.node.domain_keys()
    domain_key = keys.keys[keys.generation]
    creator = f"spiffe://{layout.domain_id}/client/{DEMO_CLIENT}"
    signer = keytokens.RecordSigner(
        layout.domain_id, loaded.node.host_id, loaded.node.identity.signer
    )
    now = int(time.time())
    channel = transport.mtls_channel(
        coordinator, host_tls(layout, loaded.node.host_id), transport.COORDINATOR
    )
    stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]

    def put(index: int) -> str:
        key_id = new_key_id()
        key_policy = policy.default_policy(creator)
        key_policy.grants.extend(extra_grants)
        metadata = keys_pb2.KeyMetadata(
            key_id=key_id,
            description=description or f"rewrap benchmark {index}",
            state=keys_pb2.KEY_STATE_ENABLED,
            created_at=now,
            policy=key_policy,
            rotation=keys_pb2.RotationSettings(period_days=365),
            current_backing_version=1,
            creator=creator,
            metadata_version=1,
            domain_id=layout.domain_id,
        )
        record = keytokens.seal_record(
            metadata, {1: crypto.new_aes_key()}, domain_key, keys.generation, signer=signer
        )
        stub.PutKey(
            services_pb2.PutKeyRequest(record=record, expected_revision=0), timeout=CALL_TIMEOUT
        )
        return key_id

    try:
        with ThreadPoolExecutor(max_workers=threads or PUT_THREADS) as pool:
            return list(pool.map(put, range(count)))
    finally:
        channel.close()


def _pending(stub: Any, generation: int) -> tuple[int, int]:
    """(records not yet under `generation`, all records), read through the coordinator."""
    pending = total = 0
    token = ""
    while True:
        page = stub.ListKeyRecords(
            services_pb2.ListKeyRecordsRequest(limit=1000, page_token=token),
            timeout=CALL_TIMEOUT,
        )
        total += len(page.records)
        pending += sum(1 for r in page.records if keytokens.needs_rewrap(r, generation))
        token = page.next_page_token
        if not token:
            return pending, total


def _wait_rewrapped(
    layout: DomainLayout, coordinator: str, generation: int, deadline: float
) -> float:
    """Poll until every record is under `generation`; the time it was first seen so. One
    channel for every poll; a poll the busy coordinator does not answer in time is retried
    (until `deadline`), as any client would."""
    channel = transport.mtls_channel(coordinator, host_tls(layout, "hsa-1"), transport.COORDINATOR)
    try:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        last = "no poll answered"
        while True:
            try:
                pending, total = _pending(stub, generation)
            except grpc.RpcError as error:
                if error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                last = f"the last poll failed: {error.code().name}"
            else:
                if not pending:
                    return time.perf_counter()
                last = f"{pending} of {total} records still not re-wrapped"
            if time.perf_counter() > deadline:
                raise RuntimeError(last)
            time.sleep(POLL_SECONDS)
    finally:
        channel.close()


def _rotate_in_process(layout: DomainLayout, loaded: LoadedNode) -> int:
    """Seal a quorum-approved rotate-domain-key on hsa-1 in this process and install it there
    only (the coordinator and other HSAs never see it); the new generation."""
    node = loaded.node
    head = node.head
    signers = [
        load_file_token(token, read_passphrase(passphrase))
        for token, passphrase in list(layout.operator_tokens.values())[: layout.quorum]
    ]
    now = int(time.time())
    proposal = Proposal.create(
        domain_id=layout.domain_id,
        base_version=head.version,
        base_state_hash=head.hash,
        changes=[changes.rotate_domain_key()],
        proposer_id=signers[0].public_key.key_id,
        created_at=now,
        expires_at=now + 3600,
        reason="rewrap benchmark",
        nonce=crypto.random_bytes(16),
    )
    approvals = [quorum.approve(proposal, signer) for signer in signers]
    coordinator_cert = layout.coordinator_cert.read_bytes()

    def no_catch_up() -> int:
        return 0

    pin = CoordinatorPin.from_config(loaded.config)
    sealed = HsaAdminServicer(node, no_catch_up, coordinator=pin).ApplyProposal(
        services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
        CertificatePeerContext(coordinator_cert),  # type: ignore[arg-type]
    )
    node.offer(SealedState.from_message(sealed), source="benchmark")
    return node.domain_keys().generation


def measure_inprocess(work_dir: Path, keys: int, log: Any = print) -> dict[str, Figure]:
    """One KeyMaintainer pass in this process over `keys` records; figures."""
    layout = init_domain(work_dir / "inprocess", nodes=1, scrypt_n=FAST_SCRYPT_N)
    coordinator_process = runner.start_coordinator(layout, timeout=60)
    try:
        coordinator = runner.read_ready_file(layout.ready_file("coordinator"))
        assert coordinator is not None
        address = coordinator.address
        loaded = load_host(layout, "hsa-1")
        log(f"  inprocess: storing {keys} key records through PutKey...")
        started = time.perf_counter()
        create_records(layout, address, loaded, keys)
        create_seconds = time.perf_counter() - started
        generation = _rotate_in_process(layout, loaded)
        channel = transport.mtls_channel(address, host_tls(layout, "hsa-1"), transport.COORDINATOR)
        floor = MetadataVersionFloor(work_dir / "inprocess-floor" / FLOOR_FILE)
        try:
            cache = KeyCache(
                domain_id=layout.domain_id,
                domain_keys=loaded.node.domain_keys,
                records=KeyRecordClient(channel, address),
                floor=floor,
                signer=keytokens.RecordSigner(
                    layout.domain_id, loaded.node.host_id, loaded.node.identity.signer
                ),
            )
            maintainer = KeyMaintainer(node=loaded.node, cache=cache)
            log(f"  inprocess: re-wrapping to domain key generation {generation}...")
            started = time.perf_counter()
            report = maintainer.run_pass()
            seconds = time.perf_counter() - started
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            pending, total = _pending(stub, generation)
        finally:
            channel.close()
            floor.close()
    finally:
        runner.stop_process(coordinator_process)
    if report.rewrapped != keys or pending:
        raise RuntimeError(
            f"the pass re-wrapped {report.rewrapped} of {keys} records ({pending} of {total} "
            f"still pending; {report.failed} refused, {report.conflicts} conflicts)"
        )
    return {
        "keys": keys,
        "inprocess_create_s": round(create_seconds, 3),
        "inprocess_rewrap_s": round(seconds, 3),
        "inprocess_rewrap_keys_per_s": round(keys / seconds, 1),
        "inprocess_rewrap_per_key_ms": round(1000 * seconds / keys, 3),
        "inprocess_page_size": DEFAULT_PAGE_SIZE,
    }


def _pass_lines(log_path: Path, generation: int) -> dict[str, int]:
    """Totals over the 'key pass done' lines of one HSA log for `generation`."""
    totals = {"rewrapped": 0, "conflicts": 0}
    for line in log_path.read_text(errors="replace").splitlines():
        match = _PASS_LINE.search(line)
        if match and int(match["generation"]) == generation:
            totals["rewrapped"] += int(match["rewrapped"])
            totals["conflicts"] += int(match["conflicts"])
    return totals


def measure_cluster(work_dir: Path, keys: int, log: Any = print) -> dict[str, Figure]:
    """Three HSA processes re-wrap `keys` records after a quorum rotation; figures."""
    with BenchDomain(work_dir / "cluster", nodes=3) as domain:
        layout = domain.layout
        address = domain.address("coordinator")
        loaded = load_host(layout, "hsa-1")  # read-only use: its domain keys, to seal the records
        log(f"  cluster: storing {keys} key records through PutKey...")
        create_records(layout, address, loaded, keys)
        generation = loaded.node.domain_keys().generation + 1
        log(f"  cluster: rotating the domain key (quorum) to generation {generation}...")
        applied = apply_change(domain, [changes.rotate_domain_key()])
        finished = _wait_rewrapped(
            layout, address, generation, time.perf_counter() + CLUSTER_TIMEOUT
        )
        seconds = finished - applied.started
        time.sleep(1.5)  # let the passes finish and log their summaries
        per_host = {h: _pass_lines(layout.log_file(h), generation) for h in domain.hosts}
    figures: dict[str, Figure] = {
        "keys": keys,
        "cluster_hsas": len(per_host),
        "cluster_rewrap_s": round(seconds, 3),
        "cluster_rewrap_keys_per_s": round(keys / seconds, 1),
        "cluster_poll_resolution_s": POLL_SECONDS,
    }
    for host, totals in sorted(per_host.items()):
        figures[f"cluster_{host.replace('-', '_')}_rewrapped"] = totals["rewrapped"]
        figures[f"cluster_{host.replace('-', '_')}_conflicts"] = totals["conflicts"]
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry: 1,000 keys in quick mode, 10,000 in a full run."""
    keys = int(config.pick(1_000, DEFAULT_KEYS))
    figures = measure_inprocess(config.directory(NAME), keys, config.log)
    figures.update(measure_cluster(config.directory(NAME), keys, config.log))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements, print them, write JSON when asked."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.rewrap",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m bench.rewrap --keys 10000 --json rewrap.json",
    )
    parser.add_argument("--keys", type=int, default=DEFAULT_KEYS, help="key records to re-wrap")
    parser.add_argument(
        "--mode", choices=("both", "inprocess", "cluster"), default="both", help="what to run"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.keys < 1:
        parser.error("--keys must be at least 1")
    figures: dict[str, Figure] = {"keys": args.keys}
    with tempfile.TemporaryDirectory(prefix="bench-rewrap-") as scratch:
        work = Path(scratch)
        if args.mode in ("both", "inprocess"):
            figures.update(measure_inprocess(work, args.keys))
            print(
                f"inprocess: re-wrapped {args.keys} keys in {figures['inprocess_rewrap_s']} s "
                f"({figures['inprocess_rewrap_keys_per_s']} keys/s, one HSA, no pauses)"
            )
        if args.mode in ("both", "cluster"):
            figures.update(measure_cluster(work, args.keys))
            print(
                f"cluster: re-wrapped {args.keys} keys in {figures['cluster_rewrap_s']} s "
                f"({figures['cluster_rewrap_keys_per_s']} keys/s, 3 HSA processes, from the final "
                "approval of the rotation)"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except grpc.RpcError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)

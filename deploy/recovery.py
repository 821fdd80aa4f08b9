"""`hsm-domain recover DIR --backup FILE`: rebuild a domain whose HSAs were all lost
(docs/disaster-recovery.md).

1. verifies FILE against DIR's pinned genesis (the backup holds the chain, whose newest state
   carries the recovery package);
2. refuses while a process of DIR runs, or while a node directory of a host of the backup's
   newest state exists (those hosts are lost, or this is no disaster: move them aside first);
3. restores FILE into DIR's empty store (or finds it restored already: same counts);
4. prepares new nodes (fresh host keys, CA-issued certificates, enrollments; their key floor
   tables start complete from the backup), the first the session host, which gets a fresh
   X25519 session key in its identity directory (0600);
5. writes the session file DIR/recovery-session.bin (the recover change for the operators:
   `hsm-operator recovery contribute --session`), starts the domain detached, and prints
   what each operator compares: the base state, the new hosts' key fingerprints, the session
   key's fingerprint.
Run again, it resumes: when the session file, the session's nodes and a session key that
matches the file are there for the backup's newest state, it only starts what does not run
(shares given to that session stay good). `--abandon` ends a
session: its key and file are removed, so no share sealed to it opens; nothing else changes.
Nothing is applied to the domain until a quorum's recover proposal is sealed by the session
host and stored by the coordinator (one write): an interrupted recovery leaves no half state.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any, Final

from deploy._runfiles import domain_lock, running_processes
from deploy._store_admin import run_store_tool
from deploy._up import start_detached
from deploy.backup import read_genesis, say, store_alone
from deploy.enrollment import host_key_fingerprints
from deploy.init import DomainLayout, add_node, load_layout
from domain_core.backup import BackupSummary
from domain_core.display import escape, hex_groups
from domain_core.errors import FailedPreconditionError, HsmDomainError, InvalidInputError
from domain_core.model import recovered_hosts
from domain_core.recovery_shares import x25519_public_key
from domain_edge.backup_files import verify_backup
from domain_edge.cli import Command, Progress, UsageError, console_command, print_json
from domain_edge.config import FLOORS_COMPLETE_FILE
from domain_edge.files import replace_file
from domain_edge.identity_files import (
    load_recovery_session_key,
    new_recovery_session_key,
    remove_recovery_session_key,
)
from domain_edge.recovery_sessions import read_recovery_session, write_recovery_session
from domain_proto import domain_pb2

__all__ = ["RECOVER_COMMAND", "SESSION_FILE"]

SESSION_FILE: Final = "recovery-session.bin"
_HOST_NUMBER: Final = re.compile(r"^hsa-(\d+)\Z")


def _session_path(layout: DomainLayout) -> Path:
    return layout.root / SESSION_FILE


def _new_host_ids(layout: DomainLayout, lost: tuple[str, ...], count: int) -> list[str]:
    """`count` fresh `hsa-N` ids, after every id the backup's newest state or DIR names."""
    taken = set(lost) | set(layout.node_configs) | set(layout.genesis_nodes)
    if layout.nodes_dir.is_dir():
        taken |= {p.name for p in layout.nodes_dir.iterdir()}
    start = max((int(m.group(1)) for h in taken if (m := _HOST_NUMBER.match(h))), default=0)
    return [f"hsa-{start + i}" for i in range(1, count + 1)]


def _check_lost(layout: DomainLayout, summary: BackupSummary) -> None:
    running = sorted(running_processes(layout))
    if running:
        raise FailedPreconditionError(
            f"{', '.join(running)} of {layout.root} are running: a recovery starts from a "
            f"stopped domain (`hsm-domain down {layout.root}`)"
        )
    alive = [h for h in summary.hosts if layout.node_dir(h).exists()]
    if alive:
        raise FailedPreconditionError(
            f"{', '.join(alive)} of the backup's newest state (version "
            f"{summary.newest_version}) still have node directories in {layout.nodes_dir}: "
            "recover rebuilds a domain whose HSAs are all lost; if these are, move them aside "
            "first, else start them (`hsm-domain up`)"
        )


def _restore(layout: DomainLayout, backup: Path, summary: BackupSummary, progress: Progress) -> str:
    """Restore the backup into the empty store; "restored" or "restored already"."""
    config = str(layout.store_config)
    with store_alone(layout, "recover", progress):
        contents = run_store_tool(["contents", "--config", config], say(progress))
        if any(contents["counts"].values()):
            if contents["counts"] != summary.counts.as_dict():
                raise FailedPreconditionError(
                    f"the store of {layout.root} is not empty and does not hold what "
                    f"{backup.name} holds: a recovery restores into an empty store (move "
                    "the old one aside)"
                )
            return "restored already (the store holds what the backup holds)"
        progress.step(f"restoring {backup.name} into the store of {layout.root}")
        run_store_tool(["restore", "--config", config, str(backup)], say(progress))
    return "restored"


def _resumable(layout: DomainLayout, summary: BackupSummary) -> domain_pb2.RecoverySession | None:
    """The session of an earlier run for this backup's newest state, if its nodes and its
    session key are all still there."""
    path = _session_path(layout)
    if not path.exists():
        return None
    session = read_recovery_session(path)
    host = session.recover.session_host_id
    private = load_recovery_session_key(layout.node_identity_dir(host))
    hosts = [layout.node_dir(h.host_id) for h in _new_hosts(session)]
    if (
        session.base_version != summary.newest_version
        or session.base_state_hash != summary.newest_state_hash
        or private is None
        or not all(h.is_dir() for h in hosts)
    ):
        return None
    if x25519_public_key(private) != session.recover.session_public_key:
        return None
    return session


def _new_hosts(session: domain_pb2.RecoverySession) -> list[domain_pb2.Host]:
    """The host records of the session's new hosts (from their enrollments)."""
    return recovered_hosts(domain_pb2.Change(recover=session.recover), session.domain_id)


def _open_session(
    layout: DomainLayout, summary: BackupSummary, count: int, progress: Progress
) -> domain_pb2.RecoverySession:
    """New nodes, the session host's key, the session file."""
    hosts = _new_host_ids(layout, summary.hosts, count)
    progress.step(f"preparing new nodes {', '.join(hosts)} (fresh host keys)")
    enrollments = []
    for host in hosts:
        path = add_node(layout.root, host)
        replace_file(
            layout.node_data_dir(host) / FLOORS_COMPLETE_FILE,
            (layout.genesis_hash.hex() + "\n").encode(),
        )
        enrollments.append(path.read_bytes())
    session_public = new_recovery_session_key(layout.node_identity_dir(hosts[0]))
    session = domain_pb2.RecoverySession(
        domain_id=layout.domain_id,
        base_version=summary.newest_version,
        base_state_hash=summary.newest_state_hash,
        recover=domain_pb2.Recover(
            enrollments=enrollments, session_host_id=hosts[0], session_public_key=session_public
        ),
        created_at=int(time.time()),
    )
    path = _session_path(layout)
    path.unlink(missing_ok=True)
    write_recovery_session(path, session)
    return session


def _session_json(layout: DomainLayout, session: domain_pb2.RecoverySession) -> dict[str, Any]:
    hosts = [
        {
            "host_id": record.host_id,
            "key_sha256": {label: d.hex() for label, d in host_key_fingerprints(record)},
        }
        for record in _new_hosts(session)
    ]
    return {
        "directory": str(layout.root),
        "session_file": str(_session_path(layout)),
        "domain_id": session.domain_id,
        "base_version": session.base_version,
        "base_state_hash": session.base_state_hash.hex(),
        "session_host": session.recover.session_host_id,
        "session_key_sha256": hashlib.sha256(session.recover.session_public_key).hexdigest(),
        "new_hosts": hosts,
    }


def _print_session(document: dict[str, Any], restored: str, started: list[str]) -> None:
    print(
        escape(f"recovery session of domain {document['domain_id']!r} in {document['directory']}")
    )
    print(f"  store        {restored}")
    print(
        f"  base state   version {document['base_version']} "
        f"({document['base_state_hash'][:16]}), the backup's newest"
    )
    print(f"  session key  SHA-256 {hex_groups(document['session_key_sha256'])}")
    print(f"  session host {document['session_host']}")
    for host in document["new_hosts"]:
        print(f"  new host {host['host_id']}:")
        for label, digest in host["key_sha256"].items():
            print(f"    {label:<22} SHA-256 {hex_groups(digest)}")
    if started:
        print(f"  started      {', '.join(started)}")
    print(
        "next: operators compare these fingerprints with what `proposals show` prints, then a "
        "quorum (at least the recovery threshold) each run:\n"
        f"  {console_command('hsm-operator')} recovery contribute --session "
        f"{document['session_file']} --cluster {document['directory']} --token TOKEN "
        "--recovery-token RECOVERY\n"
        "once it applies, remove the lost hosts with one remove-host proposal (their key "
        "records are signed again by the new hosts and the domain key rotates)"
    )


def _cmd_recover(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    if args.abandon:
        return _abandon(layout, args)
    if args.backup is None:
        raise UsageError("recover needs --backup FILE (or --abandon to end a session)")
    if args.nodes is not None and not 1 <= args.nodes <= 16:
        raise InvalidInputError("--nodes is 1 to 16")
    backup = Path(args.backup).absolute()
    progress = Progress(sys.stderr if args.json else sys.stdout)
    progress.step(f"verifying {backup.name} against {layout.genesis_state}")
    summary = verify_backup(backup, read_genesis(layout.genesis_state), progress=say(progress))
    with domain_lock(layout, f"hsm-domain recover {layout.root}"):
        session = _resumable(layout, summary)
        if session is None:
            _check_lost(layout, summary)
            restored = _restore(layout, backup, summary, progress)
            count = args.nodes or len(summary.hosts)
            session = _open_session(layout, summary, count, progress)
        else:
            progress.step("resuming the recovery session of an earlier run")
            restored = "restored by an earlier run (resuming its session)"
    layout = load_layout(layout.root)
    progress.step("starting the coordinator and the new nodes")
    started = start_detached(layout, progress, timeout=args.timeout)
    progress.clear()
    document = _session_json(layout, session)
    if args.json:
        print_json({**document, "store": restored, "started": started})
        return 0
    _print_session(document, restored, started)
    return 0


def _abandon(layout: DomainLayout, args: argparse.Namespace) -> int:
    path = _session_path(layout)
    if not path.exists():
        raise FailedPreconditionError(f"no recovery session in {layout.root}")
    try:
        session = read_recovery_session(path)
        host = session.recover.session_host_id
        removed = remove_recovery_session_key(layout.node_identity_dir(host))
    except HsmDomainError:
        host, removed = "", False
    path.unlink()
    document = {"directory": str(layout.root), "abandoned": True, "session_key_removed": removed}
    if args.json:
        print_json(document)
        return 0
    print(
        escape(
            f"abandoned the recovery session in {layout.root}"
            + (f": the session key of {host} is gone" if removed else "")
            + ", so no share sealed to it opens; the restored store and the new nodes stay "
            "(`hsm-domain recover` with the backup opens a new session; the pending recover "
            "proposal can no longer apply)"
        )
    )
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the domain directory (its genesis pin)")
    parser.add_argument("--backup", metavar="FILE", help="the backup to recover from")
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="new nodes to prepare (default: as many hosts as the backup's newest state has)",
    )
    parser.add_argument(
        "--abandon", action="store_true", help="end the session: remove its key and its file"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each start (default 60)"
    )
    parser.add_argument("--json", action="store_true", help="print the session as JSON")


RECOVER_COMMAND: Final = Command(
    "recover",
    "rebuild a domain whose HSAs were all lost: restore a backup, start new nodes, and open a "
    "recovery session for a quorum of operators' recovery shares",
    _cmd_recover,
    """
    hsm-domain recover ./demo --backup demo.backup
    hsm-domain recover ./demo --backup demo.backup   # again: resumes the same session
    hsm-domain recover ./demo --abandon
    """,
    notes="docs/disaster-recovery.md walks through the whole ceremony.",
    arguments=_arguments,
)

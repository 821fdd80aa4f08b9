"""`hsm-domain backup`, `backup verify`, `restore` and `store migrate`: backups of a local
domain's coordinator store that verify themselves (docs/runtime.md "Backups").

- `backup DIR FILE` writes a consistent snapshot of the store of DIR's coordinator to FILE (a
  new file, 0600), then verifies it; the coordinator may run meanwhile.
- `backup verify FILE --genesis GENESIS` checks FILE offline, trusting only GENESIS (e.g.
  DIR/genesis.state): the chain from it, every key record from a member, every count.
- `restore DIR FILE` refuses unless DIR's coordinator is stopped and its store is empty; asks
  the running HSAs for their key floors and verifies FILE against DIR's genesis, listing every
  key whose newest version FILE lacks (the HSAs refuse the older record); then loads FILE,
  verified again record by record, all or nothing.
- `store migrate DIR --to SPEC` copies the store to the empty store SPEC with the coordinator
  stopped, compares the two, and only then switches the coordinator config to SPEC.
- on a domain with its own etcd cluster (`init --coordinators N`), restore and migrate start
  the members that do not run (after `down`, or a fresh cluster after the old one was lost)
  and stop those again when done.

Invariants: the store itself is only touched by the coordinator's store tool, run as a
process (`_store_admin`); restore and migrate hold the domain's lock (`domain_lock`) so that
`up` cannot start the coordinator half way, and refuse while a coordinator of DIR runs; what
is printed is escaped (`display.escape`) and holds no secret (a backup holds none).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from deploy import _domain_etcd
from deploy._floors import FloorCheck, KeyBehind
from deploy._runfiles import domain_lock, running_processes
from deploy._store_admin import run_store_tool
from deploy.cluster import remove_run_files
from deploy.etcd import EtcdProcess
from deploy.init import DomainLayout, load_layout
from domain_core.backup import BackupSummary, StoreCounts
from domain_core.display import escape
from domain_core.errors import FailedPreconditionError, LimitExceededError
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import SealedState
from domain_edge.backup_files import verify_backup
from domain_edge.cli import Command, Group, Progress, UsageError, console_command, print_json
from domain_edge.files import read_limited

__all__ = [
    "BACKUP_COMMAND",
    "RESTORE_COMMAND",
    "STORE_GROUP",
    "read_genesis",
    "say",
    "store_alone",
]

_VERIFY: Final = "verify"
_ETCD_START_SECONDS: Final = 60.0
_EMPTYING_HINT: Final = {
    False: "move the old one aside first, e.g. rename DIR/coordinator/coordinator.db and its "
    "-wal file",
    True: "on this domain's etcd cluster: `hsm-domain down DIR`, move DIR/etcd/etcd-*/ aside, "
    "and restore again; a fresh cluster starts",
}


def _short(value: str) -> str:
    return value[:12] if value else "-"


def _holds(counts: dict[str, int]) -> str:
    return StoreCounts(**counts).describe()


def say(progress: Progress) -> Callable[[str], None]:
    """Progress lines of a long step (escaped: they may quote relayed text)."""
    return lambda text: progress.update(escape(text))


def read_genesis(path: Path) -> bytes:
    """The genesis state file a backup is checked against, within the size of a state."""
    limit = DEFAULT_LIMITS.max_message_bytes
    return read_limited(
        path, limit, lambda: LimitExceededError(f"{path} is larger than a state ({limit} bytes)")
    )


@contextmanager
def store_alone(layout: DomainLayout, command: str, progress: Progress) -> Iterator[None]:
    """The store with no coordinator on it, for restore and migrate: refuses while a
    coordinator of the domain runs; for a domain on its own etcd cluster (`init --coordinators
    N`, which `down` stops with the rest), its members run while the body does, and those
    started here are stopped again afterwards."""
    _stopped_coordinator(layout, command)
    if layout.etcd is None:
        yield
        return
    running = {n: p for n, p in running_processes(layout).items() if n in layout.etcd_members}
    started: dict[str, EtcdProcess] = {}
    try:
        if len(running) < len(layout.etcd_members):
            progress.step("starting the domain's etcd members (stopped again afterwards)")
            _domain_etcd.start_members(
                layout,
                running,
                timeout=_ETCD_START_SECONDS,
                on_start=lambda name, process: started.__setitem__(name, process),
            )
        yield
    finally:
        for process in started.values():
            process.stop()
        remove_run_files(layout, started)


def _stopped_coordinator(layout: DomainLayout, command: str) -> None:
    """FailedPreconditionError while a coordinator of the domain runs."""
    running = {n: p for n, p in running_processes(layout).items() if n in layout.coordinators}
    if running:
        names = ", ".join(f"{name} (pid {pid})" for name, pid in sorted(running.items()))
        raise FailedPreconditionError(
            f"{names} of {layout.root} is running: {command} needs it stopped (`hsm-domain "
            f"down {layout.root}` stops the domain; the HSAs may run on)"
        )


# --- backup and backup verify ----------------------------------------------------------------


def _cmd_backup(args: argparse.Namespace) -> int:
    if args.target == _VERIFY:
        return _cmd_verify(args)
    if args.genesis is not None:
        raise UsageError("--genesis goes with `backup verify FILE`; a backup uses DIR's genesis")
    layout = load_layout(Path(args.target))
    progress = Progress(sys.stderr if args.json else sys.stdout)
    target = Path(args.file).absolute()
    result = run_store_tool(
        ["backup", "--config", str(layout.store_config), str(target)], say(progress)
    )
    progress.clear()
    if args.json:
        print_json(result)
        return 0
    print(
        escape(
            f"backed up domain {result['domain_id']!r} at version {result['newest_version']} "
            f"to {target}"
        )
    )
    print(escape(f"  holds {_holds(result['counts'])}"))
    print(f"  sha256 {result['sha256']}")
    print(f"  verified against the pinned genesis {_short(result['genesis_hash'])}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.genesis is None:
        raise UsageError(
            "backup verify needs --genesis GENESIS: the genesis state you trust, e.g. "
            "DIR/genesis.state (the backup is checked against it and nothing else)"
        )
    path = Path(args.file)
    progress = Progress(sys.stderr if args.json else sys.stdout)
    genesis = read_genesis(Path(args.genesis))
    summary = verify_backup(path, genesis, progress=say(progress))
    progress.clear()
    if args.json:
        print_json({"file": str(path), "verified": True, **summary.to_json()})
        return 0
    _print_summary(f"{path} verifies", summary)
    return 0


def _print_summary(first: str, summary: BackupSummary) -> None:
    print(
        escape(f"{first}: domain {summary.domain_id!r}, genesis {summary.genesis_hash.hex()[:12]}")
    )
    print(
        escape(
            f"  newest state version {summary.newest_version} "
            f"({summary.newest_state_hash.hex()[:12]}), hosts {', '.join(summary.hosts)}"
        )
    )
    print(escape(f"  holds {summary.counts.describe()}"))


# --- restore ---------------------------------------------------------------------------------


def _restore_json(
    result: dict[str, Any], check: FloorCheck, behind: list[KeyBehind]
) -> dict[str, Any]:
    return {
        **result,
        "hsas_asked": check.asked,
        "hsa_version": check.head_version,
        "keys_behind": [k.to_json() for k in behind],
    }


def _print_behind(behind: list[KeyBehind]) -> None:
    print(
        f"WARNING: the backup lacks the newest version of {len(behind)} key(s); the HSAs "
        "refuse its older records (they know newer ones), so these keys stay unusable:"
    )
    for key in behind:
        if key.backup_version == 0:
            held = "not in the backup"
        elif key.same_version_other_metadata:
            held = f"backup v{key.backup_version} with other metadata"
        else:
            held = f"backup v{key.backup_version}"
        print(escape(f"  {key.key_id}  {held}; {key.known_by} knows v{key.newest_version}"))


def _cmd_restore(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    path = Path(args.file).absolute()
    progress = Progress(sys.stderr if args.json else sys.stdout)
    config = str(layout.store_config)
    with (
        domain_lock(layout, f"hsm-domain restore {layout.root}"),
        store_alone(layout, "restore", progress),
    ):
        contents = run_store_tool(["contents", "--config", config], say(progress))
        if any(contents["counts"].values()):
            raise FailedPreconditionError(
                f"the store of {layout.root} ({contents['store']}) is not empty: it holds "
                f"{_holds(contents['counts'])}; restore only into an empty store ("
                + _EMPTYING_HINT[layout.etcd is not None]
                + ")"
            )
        genesis = read_genesis(layout.genesis_state)
        check = FloorCheck(layout, SealedState.from_bytes(genesis))
        progress.step("asking the HSAs for their key floors (the files of stopped ones)")
        check.collect()
        progress.step(f"verifying {path.name} against {layout.genesis_state}")
        summary = verify_backup(path, genesis, on_key=check.compare, progress=say(progress))
        behind = check.finish()
        result = run_store_tool(["restore", "--config", config, str(path)], say(progress))
    progress.clear()
    if args.json:
        print_json(_restore_json(result, check, behind))
        return 0
    _print_summary(f"restored {path} into the store of {layout.root}", summary)
    asked = "; ".join(f"{host}: {said}" for host, said in sorted(check.asked.items()))
    print(escape(f"key floors of the HSAs: {asked or 'no HSA configured'}"))
    if behind:
        _print_behind(behind)
    if check.head_version > summary.newest_version:
        print(
            f"the HSAs are at version {check.head_version}, the backup at "
            f"{summary.newest_version}: the coordinator fetches the newer states from them when "
            "it starts (see `store behind the HSAs` in docs/operator-guide.md)"
        )
    print(f"next: {console_command('hsm-domain')} up {layout.root}")
    return 0


# --- store migrate ---------------------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    progress = Progress(sys.stderr if args.json else sys.stdout)
    with (
        domain_lock(layout, f"hsm-domain store migrate {layout.root}"),
        store_alone(layout, "store migrate", progress),
    ):
        result = run_store_tool(
            ["migrate", "--config", str(layout.store_config), "--to", args.to],
            say(progress),
        )
    progress.clear()
    if args.json:
        print_json(result)
        return 0
    print(
        escape(
            f"migrated the store of {layout.root} from {result['old_store']} to "
            f"{result['new_store']}: {_holds(result['counts'])}, newest state version "
            f"{result['newest_version']}"
        )
    )
    print(f"  both stores compared equal (SHA-256 over every item {result['sha256'][:16]}...)")
    print(escape(f"  {result['config']} now names {result['new_store']}"))
    print(escape(f"  the old store ({result['old_store']}) is left as it was"))
    print(f"next: {console_command('hsm-domain')} up {layout.root}")
    return 0


# --- the commands ----------------------------------------------------------------------------


def _backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", metavar="DIR", help="the domain directory; or the word `verify` to check FILE"
    )
    parser.add_argument("file", metavar="FILE", help="the backup file (new, or to verify)")
    parser.add_argument(
        "--genesis",
        metavar="GENESIS",
        help="with `verify`: the genesis state you trust (e.g. DIR/genesis.state)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the domain directory")
    parser.add_argument("file", metavar="FILE", help="the backup file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the domain directory")
    parser.add_argument(
        "--to",
        required=True,
        metavar="SPEC",
        help="the new store, as the coordinator config's `store` value (sqlite:PATH, a "
        "relative PATH being relative to DIR/coordinator/)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


BACKUP_COMMAND: Final = Command(
    "backup",
    "write a backup of the coordinator's store (DIR FILE), or check one offline "
    "(verify FILE --genesis GENESIS)",
    _cmd_backup,
    """
    hsm-domain backup ./demo demo-2026-12-01.backup
    hsm-domain backup verify demo-2026-12-01.backup --genesis ./demo/genesis.state
    hsm-domain backup verify demo-2026-12-01.backup --genesis ./demo/genesis.state --json
    """,
    notes="""
    A backup holds the store's states, proposals, key records, registrations and audit
    heads: all public or sealed, nothing secret. `verify` trusts GENESIS only: the chain
    from it, every key record signed by a member, every count. Exit status 0 when the
    backup was written and verifies (or verifies), 1 otherwise.
    """,
    arguments=_backup_arguments,
)

RESTORE_COMMAND: Final = Command(
    "restore",
    "load a backup into DIR's empty store (coordinator stopped), listing the keys whose "
    "newest version the backup lacks",
    _cmd_restore,
    """
    hsm-domain down ./demo && mv ./demo/coordinator/coordinator.db{,.old}
    hsm-domain restore ./demo demo-2026-12-01.backup
    hsm-domain up ./demo
    """,
    notes="""
    The backup is verified against DIR/genesis.state and loaded all or nothing. Running
    HSAs are asked for their key floors: keys they know newer versions of are listed (the
    HSAs refuse the backup's older records). Exit status 0 when restored, 1 otherwise.
    """,
    arguments=_restore_arguments,
)

STORE_GROUP: Final = Group(
    "store",
    "move the coordinator's store",
    "hsm-domain store migrate ./demo --to sqlite:coordinator-new.db",
    commands=(
        Command(
            "migrate",
            "copy the store to an empty new one (coordinator stopped), compare, then switch "
            "the coordinator config to it",
            _cmd_migrate,
            """
            hsm-domain store migrate ./demo --to sqlite:coordinator-new.db
            hsm-domain store migrate ./demo --to sqlite:/srv/hsm/coordinator.db --json
            """,
            notes="the old store is left as it was; exit status 0 when migrated, 1 otherwise",
            arguments=_migrate_arguments,
        ),
    ),
    metavar="STORE_COMMAND",
)

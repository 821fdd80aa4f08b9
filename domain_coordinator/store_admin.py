"""`python -m domain_coordinator.store_admin COMMAND --config FILE ...`: the coordinator's store
offline, for `hsm-domain backup`, `restore` and `store migrate` (which run it).

Commands (each on the store the coordinator config names, with the genesis state it pins):
    contents --config FILE               how many items of each kind the store holds
    backup   --config FILE BACKUP        write a backup (a new file), then verify it
    restore  --config FILE BACKUP        load a backup into the empty store, verified
    migrate  --config FILE --to SPEC     copy the store to the empty store SPEC, compare,
                                         then switch the config's `store` to SPEC

It speaks JSON lines on stdout, for the program that runs it: `{"progress": TEXT}` now and
then, then one last line, `{"ok": true, "result": {...}}` (exit status 0) or `{"ok": false,
"error": TEXT, "status": NAME}` (exit status 1). Nothing it prints holds a secret: the store
holds none.

Invariants: it runs in its own process, so `hsm-domain` (the `deploy` package) never imports
the coordinator's code; the genesis state file must hash to the config's pinned genesis hash
before anything is verified against it; the rules of each command are `backups`'.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domain_coordinator.backups import migrate_store, restore_backup, write_backup
from domain_coordinator.store import CoordinatorStore
from domain_coordinator.store_spec import open_store
from domain_core.errors import GenesisMismatchError, HsmDomainError
from domain_core.model import SealedState
from domain_edge.config import CoordinatorConfig
from domain_edge.files import read_limited

__all__ = ["main"]


def _say(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def _progress(text: str) -> None:
    _say({"progress": text})


def _genesis(config: CoordinatorConfig) -> bytes:
    """The pinned genesis state's bytes, checked against the config's genesis hash."""
    path = config.path(config.genesis_state)
    raw = read_limited(path, config.effective_limits().max_message_bytes)
    if SealedState.from_bytes(raw, config.effective_limits()).hash.hex() != config.genesis_hash:
        raise GenesisMismatchError(
            f"{path} is not the genesis state the coordinator config pins (its hash differs)"
        )
    return raw


def _open(config: CoordinatorConfig, config_path: Path) -> CoordinatorStore:
    return open_store(config.store, config.base_dir or config_path.parent)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    config_path = Path(args.config)
    if args.command == "migrate":
        done = migrate_store(config_path, args.to, progress=_progress)
        return {
            "counts": done.counts.as_dict(),
            "newest_version": done.newest_version,
            "sha256": done.sha256.hex(),
            "config": str(done.config),
            "old_store": done.old_store,
            "new_store": done.new_store,
        }
    config = CoordinatorConfig.load(config_path)
    store = _open(config, config_path)
    try:
        if args.command == "contents":
            return {"store": config.store, "counts": store.contents().as_dict()}
        genesis, limits = _genesis(config), config.effective_limits()
        if args.command == "backup":
            written = write_backup(store, Path(args.file), genesis, limits, progress=_progress)
            return {
                "file": str(written.path),
                "sha256": written.sha256.hex(),
                **written.summary.to_json(),
            }
        summary = restore_backup(store, Path(args.file), genesis, limits, progress=_progress)
        return {"store": config.store, **summary.to_json()}
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m domain_coordinator.store_admin",
        description="The coordinator's store offline (backup, restore, migrate); JSON lines "
        "on stdout. hsm-domain backup, restore and store migrate run it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("contents", "backup", "restore", "migrate"):
        command = commands.add_parser(name)
        command.add_argument("--config", required=True, help="the coordinator's config file")
        if name in ("backup", "restore"):
            command.add_argument("file", help="the backup file")
        if name == "migrate":
            command.add_argument("--to", required=True, help="the new store value (SCHEME:VALUE)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0 done, 1 refused or failed, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except HsmDomainError as error:
        _say({"ok": False, "error": error.message, "status": error.status.name})
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        _say({"ok": False, "error": f"{error.strerror or error}{where}", "status": "OS_ERROR"})
        return 1
    _say({"ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost of recovery packages (issue 16): what each produced state pays, what a recovery pays.

For N operators with X25519 recovery keys and a recovery threshold M, with seven domain key
generations (the default kept): the time to build a state's package (a fresh key-encryption
key, the domain keys under it, a SLIP-39 split, N shares sealed), its size in the state, and
the time to rebuild the keys from M shares (M shares opened, combined, the keys opened).
In process, one core; `recovery_build_ms_n<N>_m<M>`, `recovery_rebuild_ms_n<N>_m<M>` (medians)
and `recovery_package_bytes_n<N>_m<M>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from domain_core import crypto, model
from domain_core.model import Manifest
from domain_core.recovery import build_package, open_operator_share, open_package
from domain_core.recovery_shares import x25519_agreement
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_proto import domain_pb2

TITLE: Final = "recovery packages: build per state, rebuild from M shares"
CASES: Final = ((3, 2), (5, 3), (16, 9))
GENERATIONS: Final = 7


def _manifest(count: int, threshold: int) -> tuple[Manifest, dict[str, Callable[[bytes], bytes]]]:
    operators = []
    agreements: dict[str, Callable[[bytes], bytes]] = {}
    for i in range(count):
        operator = model.make_operator(
            f"op{i}", InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
        )
        private = x25519.X25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        operator.recovery_key.CopyFrom(
            domain_pb2.RecoveryKey(
                algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519,
                public_key=private.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                ),
            )
        )
        operators.append(operator)
        agreements[operator.operator_id] = x25519_agreement(raw)
    manifest = Manifest.from_message(
        domain_pb2.Manifest(
            domain_id="bench",
            version=5,
            previous_state_hash=b"\x07" * 32,
            operators=operators,
            quorum=domain_pb2.QuorumPolicy(threshold=2, recovery_threshold=threshold),
            settings=domain_pb2.DomainSettings(key_generations_retained=GENERATIONS),
            key_generations=[
                domain_pb2.KeyGeneration(generation=g) for g in range(1, GENERATIONS + 1)
            ],
            created_at=1_800_000_000,
        )
    )
    return manifest, agreements


def run(repeats: int) -> dict[str, float | int]:
    """The figures, each case measured `repeats` times."""
    figures: dict[str, float | int] = {}
    for count, threshold in CASES:
        manifest, agreements = _manifest(count, threshold)
        keys = {g: crypto.new_aes_key() for g in range(1, GENERATIONS + 1)}
        builds, rebuilds = [], []
        package = None
        for _ in range(repeats):
            began = time.perf_counter()
            package = build_package(manifest, keys)
            builds.append(time.perf_counter() - began)
        assert package is not None
        contributors = [o.operator_id for o in manifest.message.operators][:threshold]
        for _ in range(repeats):
            began = time.perf_counter()
            shares = [
                open_operator_share(manifest, package, operator, agreements[operator])
                for operator in contributors
            ]
            rebuilt = open_package(manifest, package, shares)
            rebuilds.append(time.perf_counter() - began)
            if rebuilt != keys:
                raise RuntimeError("the package did not rebuild the keys it was built from")
        case = f"n{count}_m{threshold}"
        figures[f"recovery_build_ms_{case}"] = statistics.median(builds) * 1000
        figures[f"recovery_rebuild_ms_{case}"] = statistics.median(rebuilds) * 1000
        figures[f"recovery_package_bytes_{case}"] = len(package.SerializeToString())
    return figures


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.recovery [--quick] [--json FILE]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=TITLE)
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 50")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args(argv)
    figures = run(5 if args.quick else 50)
    for key, value in figures.items():
        print(f"{key:40} {value:.3f}" if isinstance(value, float) else f"{key:40} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

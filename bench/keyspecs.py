"""Key specs beyond symmetric encryption: what Sign, Verify, RSA-OAEP and HMAC cost (issue 19).

Two parts. **In process** (`domain_core.keyspecs`, no domain, no network): µs of CPU per
operation of a loaded key, for each signing key spec, RSA-OAEP decrypt and HMAC, so that the
asymmetric quota (`Limits.asymmetric_requests_per_second`) and a host's sizing rest on
figures. **Through a one-HSA domain** (`KeyClient`, unary calls from one thread): the latency
of Sign, Verify, GenerateMac, GetPublicKey and RSA-OAEP Decrypt next to a symmetric Encrypt
in the same run, so what a key spec adds to a call reads off directly.

    python -m bench.keyspecs [--ops N] [--json FILE]

It is also a module of the `python -m bench` runner (NAME, TITLE, run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure
from bench._stats import summarize_ms
from domain_core import keyspecs
from domain_edge.kms_client import KeyClient
from domain_proto import keys_pb2

__all__ = ["NAME", "TITLE", "main", "measure_domain", "measure_local", "run"]

NAME: Final = "keyspecs"
TITLE: Final = "Sign, Verify, RSA-OAEP and HMAC: CPU per operation and call latency"

MESSAGE: Final = b"m" * 1024

# (figure name, key spec, signing algorithm) of the in-process signing cells.
_SIGNING: Final = (
    ("ecdsa_p256", keys_pb2.KEY_SPEC_ECC_NIST_P256, keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_256),
    ("ecdsa_p384", keys_pb2.KEY_SPEC_ECC_NIST_P384, keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_384),
    ("ecdsa_p521", keys_pb2.KEY_SPEC_ECC_NIST_P521, keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_512),
    ("rsa2048_pss", keys_pb2.KEY_SPEC_RSA_2048, keys_pb2.SIGNING_ALGORITHM_RSASSA_PSS_SHA_256),
    ("rsa3072_pss", keys_pb2.KEY_SPEC_RSA_3072, keys_pb2.SIGNING_ALGORITHM_RSASSA_PSS_SHA_256),
    (
        "rsa4096_pkcs1",
        keys_pb2.KEY_SPEC_RSA_4096,
        keys_pb2.SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_256,
    ),
)


def _us_per_op(operation: Callable[[], object], ops: int) -> float:
    """CPU µs per call of `operation` (process time: what the HSA's cores would spend)."""
    operation()
    started = time.process_time()
    for _ in range(ops):
        operation()
    return round((time.process_time() - started) / ops * 1e6, 1)


def _signing_cell(name: str, spec: int, algorithm: int, ops: int) -> dict[str, Figure]:
    """µs of CPU per sign, verify and key generation of one signing spec."""
    raw = keys_pb2.MESSAGE_TYPE_RAW
    key = keyspecs.AsymmetricKey.load(
        spec, keys_pb2.KEY_USAGE_SIGN_VERIFY, keyspecs.new_material(spec)
    )
    signature = key.sign(algorithm, MESSAGE, raw)
    generations = 3 if spec == keys_pb2.KEY_SPEC_RSA_4096 else max(3, ops // 50)
    return {
        f"sign_us_{name}": _us_per_op(lambda: key.sign(algorithm, MESSAGE, raw), ops),
        f"verify_us_{name}": _us_per_op(
            lambda: key.verify(algorithm, MESSAGE, raw, signature), ops
        ),
        f"create_us_{name}": _us_per_op(lambda: keyspecs.new_material(spec), generations),
    }


def measure_local(ops: int) -> dict[str, Figure]:
    """µs of CPU per sign and verify of each signing spec, per RSA-OAEP decrypt, per HMAC,
    and per key generation of the spec (`new_material`, fewer repetitions)."""
    figures: dict[str, Figure] = {"local_ops_per_cell": ops}
    for name, spec, algorithm in _SIGNING:
        figures.update(_signing_cell(name, spec, algorithm, ops))
    oaep = keys_pb2.ENCRYPTION_ALGORITHM_RSAES_OAEP_SHA_256
    rsa = keyspecs.AsymmetricKey.load(
        keys_pb2.KEY_SPEC_RSA_2048,
        keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT,
        keyspecs.new_material(keys_pb2.KEY_SPEC_RSA_2048),
    )
    blob = rsa.encrypt(oaep, b"k" * 32)
    figures["oaep_decrypt_us_rsa2048"] = _us_per_op(lambda: rsa.decrypt(oaep, blob), ops)
    mac_key = keyspecs.new_material(keys_pb2.KEY_SPEC_HMAC_256)
    figures["hmac_us_sha256"] = _us_per_op(
        lambda: keyspecs.generate_mac(
            keys_pb2.KEY_SPEC_HMAC_256, mac_key, keys_pb2.MAC_ALGORITHM_HMAC_SHA_256, MESSAGE
        ),
        ops * 10,
    )
    return figures


def _latencies(call: Callable[[], object], ops: int, prefix: str) -> dict[str, float]:
    call()  # the key is cached (and its private key parsed) before the clock runs
    samples: list[int] = []
    for _ in range(ops):
        started = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - started)
    return summarize_ms(samples, prefix)


def measure_domain(ops: int, directory: Path) -> dict[str, Figure]:
    """p50/p99 (ms) of each call through a one-HSA domain, one caller, unary."""
    figures: dict[str, Figure] = {"domain_ops_per_cell": ops}
    with BenchDomain(directory, nodes=1) as domain:
        tls = domain.client_tls()
        with KeyClient(
            [domain.address(domain.hosts[0])],
            ca_pem=tls.ca_pem,
            cert_pem=tls.cert_pem,
            key_pem=tls.key_pem,
            sessions=False,
        ) as client:
            aes = client.create_key().key_id
            p256 = client.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY").key_id
            rsa = client.create_key(key_spec="RSA_2048", key_usage="SIGN_VERIFY").key_id
            oaep = client.create_key(key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT").key_id
            mac = client.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC").key_id
            signature = client.sign(p256, MESSAGE, "ECDSA_SHA_256")
            blob = client.encrypt(oaep, b"k" * 32, encryption_algorithm="RSAES_OAEP_SHA_256")
            cells: dict[str, Callable[[], object]] = {
                "encrypt_symmetric": lambda: client.encrypt(aes, MESSAGE),
                "sign_ecdsa_p256": lambda: client.sign(p256, MESSAGE, "ECDSA_SHA_256"),
                "verify_ecdsa_p256": lambda: client.verify(
                    p256, MESSAGE, signature, "ECDSA_SHA_256"
                ),
                "sign_rsa2048_pss": lambda: client.sign(rsa, MESSAGE, "RSASSA_PSS_SHA_256"),
                "decrypt_rsa2048_oaep": lambda: client.decrypt(
                    blob, key_id=oaep, encryption_algorithm="RSAES_OAEP_SHA_256"
                ),
                "generate_mac_hmac256": lambda: client.generate_mac(mac, MESSAGE, "HMAC_SHA_256"),
                "get_public_key_p256": lambda: client.get_public_key(p256),
            }
            for name, call in cells.items():
                figures.update(_latencies(call, ops, f"call_{name}"))
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry: 50 operations per cell in quick mode, 300 in full."""
    ops = int(config.pick(50, 300))
    return measure_local(ops) | measure_domain(ops, config.directory(f"{NAME}-domain"))


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print the figures, and write `--json` if asked."""
    parser = argparse.ArgumentParser(prog="python -m bench.keyspecs", description=__doc__)
    parser.add_argument("--ops", type=int, default=300, help="operations per cell (300)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.ops < 1:
        parser.error("--ops must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-keyspecs-") as scratch:
        figures = measure_local(args.ops) | measure_domain(args.ops, Path(scratch) / "domain")
    for name, value in figures.items():
        print(f"{name:<40} {value:,.3f}" if isinstance(value, float) else f"{name:<40} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

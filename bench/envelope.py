"""Envelope encryption of a file through the key service client, against raw AES-256-GCM.

A file of 100 MiB of random bytes (16 MiB in quick mode) is envelope-encrypted with
`domain_edge.kms_client.encrypt_envelope` (one GenerateDataKey call to a one-node domain, then
AES-256-GCM in 64 KiB chunks on this side, streamed from a temporary file to a temporary file)
and decrypted again with `decrypt_envelope` (one Decrypt call, then the chunks, streamed to an
open file). The same file is also encrypted and decrypted with AES-256-GCM straight from
`cryptography` (`AESGCM`, the same chunk size, a counter nonce, no header, no associated
data, no key service): the most this machine can do, so `envelope_*_ratio` (envelope MiB/s /
raw MiB/s) is what the envelope format and the key-service call cost on top.

Figures are in MiB/s of plaintext (1 MiB = 2**20 bytes); the files live in the benchmark's
scratch directory (page cache; nothing is fsynced except where said).
`envelope_decrypt_to_path_mib_s` is `decrypt_envelope` given a path instead of a file: its
safe mode (a temporary file, fsynced, renamed into place only once everything verified).
Every decryption is checked against the original (SHA-256, not timed). Full runs repeat 3
times, interleaving envelope and raw, and report medians; quick mode runs once.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure
from bench._stats import median
from domain_core import envelope
from domain_edge.kms_client import KeyClient, decrypt_envelope, encrypt_envelope

NAME: Final = "envelope"
TITLE: Final = "envelope encryption of a 100 MiB file (KeyClient) vs raw AES-256-GCM"

MIB: Final = 1024 * 1024
FULL_MIB: Final = 100
QUICK_MIB: Final = 16
CHUNK_BYTES: Final = envelope.DEFAULT_CHUNK_SIZE
TAG_BYTES: Final = 16
CONTEXT: Final = {"purpose": "bench-envelope"}

__all__ = ["CHUNK_BYTES", "NAME", "TITLE", "raw_decrypt", "raw_encrypt", "run"]


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        remaining = size
        while remaining > 0:
            piece = min(remaining, MIB)
            handle.write(os.urandom(piece))
            remaining -= piece


def _digest(path: Path) -> bytes:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            hasher.update(block)
    return hasher.digest()


def _nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + struct.pack(">I", counter)


def raw_encrypt(source: Path, target: Path, key: bytes, prefix: bytes) -> None:
    """AES-256-GCM of `source` in CHUNK_BYTES chunks (nonce = prefix || counter) to `target`."""
    aead = AESGCM(key)
    with source.open("rb") as reader, target.open("wb") as writer:
        counter = 0
        while chunk := reader.read(CHUNK_BYTES):
            writer.write(aead.encrypt(_nonce(prefix, counter), chunk, None))
            counter += 1


def raw_decrypt(source: Path, target: Path, key: bytes, prefix: bytes) -> None:
    """The inverse of `raw_encrypt` (InvalidTag if anything was changed)."""
    aead = AESGCM(key)
    with source.open("rb") as reader, target.open("wb") as writer:
        counter = 0
        while sealed := reader.read(CHUNK_BYTES + TAG_BYTES):
            writer.write(aead.decrypt(_nonce(prefix, counter), sealed, None))
            counter += 1


def _timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def run(config: BenchConfig) -> dict[str, Figure]:
    """Envelope and raw encryption and decryption of one file; MiB/s and ratios."""
    size = int(config.pick(QUICK_MIB, FULL_MIB)) * MIB
    repeats = int(config.pick(1, 3))
    directory = config.directory(NAME)
    directory.mkdir(parents=True)
    plain = directory / "plain.bin"
    sealed = directory / "plain.bin.envelope"
    opened = directory / "plain.bin.opened"
    raw_sealed = directory / "plain.bin.raw"
    _write_random(plain, size)
    expected = _digest(plain)
    key, prefix = AESGCM.generate_key(bit_length=256), os.urandom(8)
    seconds: dict[str, list[float]] = {}

    def check(path: Path, what: str) -> None:
        if _digest(path) != expected:
            raise RuntimeError(f"{what} did not give back the original file")

    with BenchDomain(config.directory(f"{NAME}-domain"), nodes=1) as domain:
        tls = domain.client_tls()
        with KeyClient(
            [domain.address(domain.hosts[0])],
            ca_pem=tls.ca_pem,
            cert_pem=tls.cert_pem,
            key_pem=tls.key_pem,
        ) as client:
            key_id = client.create_key(description="bench envelope").key_id
            client.generate_data_key(key_id, CONTEXT)  # the key is cached before the clock runs

            def seal() -> None:
                with plain.open("rb") as reader, sealed.open("wb") as writer:
                    encrypt_envelope(client, key_id, reader, writer, CONTEXT)

            def unseal() -> None:
                with sealed.open("rb") as reader, opened.open("wb") as writer:
                    decrypt_envelope(client, reader, writer, CONTEXT)

            def unseal_to_path() -> None:
                with sealed.open("rb") as reader:
                    decrypt_envelope(client, reader, opened, CONTEXT)

            for _ in range(repeats):
                seconds.setdefault("envelope_encrypt", []).append(_timed(seal))
                seconds.setdefault("raw_aes_gcm_encrypt", []).append(
                    _timed(lambda: raw_encrypt(plain, raw_sealed, key, prefix))
                )
                seconds.setdefault("envelope_decrypt", []).append(_timed(unseal))
                check(opened, "envelope decryption")
                seconds.setdefault("raw_aes_gcm_decrypt", []).append(
                    _timed(lambda: raw_decrypt(raw_sealed, opened, key, prefix))
                )
                check(opened, "raw decryption")
            opened.unlink()
            seconds["envelope_decrypt_to_path"] = [_timed(unseal_to_path)]
            check(opened, "envelope decryption to a path")
    mib = size / MIB
    figures: dict[str, Figure] = {
        "file_mib": mib,
        "chunk_bytes": CHUNK_BYTES,
        "envelope_overhead_bytes": sealed.stat().st_size - size,
        "repeats": repeats,
    }
    for name, values in seconds.items():
        figures[f"{name}_mib_s"] = mib / median(values)
    for direction in ("encrypt", "decrypt"):
        figures[f"envelope_{direction}_ratio"] = float(
            figures[f"envelope_{direction}_mib_s"]
        ) / float(figures[f"raw_aes_gcm_{direction}_mib_s"])
    for path in (plain, sealed, opened, raw_sealed):
        path.unlink(missing_ok=True)
    return figures

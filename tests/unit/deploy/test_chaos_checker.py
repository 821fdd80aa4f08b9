"""The chaos checker's invariants, each fed a synthetic history that keeps it and one that
breaks it; and the history recorder (JSON lines, nothing secret written).

The histories are made with the real `History` recorder and a fake clock, so they have
exactly the shape the runner writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from deploy.chaos.checker import (
    AvailabilityFigures,
    ChainEntry,
    DecryptObservation,
    FinalObservations,
    KeyObservation,
    availability,
    check_all,
    check_availability,
    check_ciphertexts,
    check_convergence,
    check_keys,
    check_monotonic,
    check_no_forks,
    check_online_decrypts,
    check_versions_in_chain,
    down_intervals,
)
from deploy.chaos.history import History, b64, from_b64, read_history, sha256_hex
from deploy.chaos.report import operations_by_outcome

pytestmark = pytest.mark.unit

NODES = ("hsa-1", "hsa-2", "hsa-3")
H = {v: f"{v:02d}" * 32 for v in range(1, 10)}  # a state hash per version
OTHER = "ff" * 32
PLAINTEXT = b"the secret test plaintext \x00\x01"
DATA_KEY = bytes(range(32))


class FakeClock:
    """A clock the test advances; each event is 0.1 s after the previous one by default."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now


@dataclass
class Scenario:
    """A recorded run: its history and the final observations a healthy domain would give."""

    history: History
    clock: FakeClock
    final: FinalObservations
    ops: dict[str, int] = field(default_factory=dict)

    def events(self) -> list[dict[str, Any]]:
        return self.history.events()


def healthy_run() -> Scenario:
    """A small run in which every invariant holds."""
    clock = FakeClock()
    history = History(clock=clock)
    history.info("runner", "start", nodes=list(NODES))
    ops: dict[str, int] = {}

    create = history.invoke("client-0", "create_key")
    history.ok(create, key_id="key-a")
    ops["create"] = create

    encrypt = history.invoke(
        "client-0", "encrypt", key_id="key-a", plaintext_sha256=sha256_hex(PLAINTEXT)
    )
    history.remember_plaintext(encrypt, PLAINTEXT)
    history.ok(encrypt, ciphertext=b64(b"blob-1"), context={"op": str(encrypt)})
    ops["encrypt"] = encrypt

    gdk = history.invoke("client-1", "generate_data_key", key_id="key-a")
    history.remember_plaintext(gdk, DATA_KEY)
    history.ok(gdk, ciphertext=b64(b"blob-2"), data_key_bytes=32)
    ops["gdk"] = gdk

    decrypt = history.invoke("client-1", "decrypt", key_id="key-a", source_op=encrypt)
    history.ok(decrypt, match=True)
    ops["decrypt"] = decrypt

    # An encrypt whose outcome is unknown: nothing to check, no plaintext needed.
    lost = history.invoke("client-2", "encrypt", key_id="key-a")
    history.unknown(lost, error="UnavailableError")

    for node in NODES:
        history.info("sampler", "status", host=node, version=1, state_hash=H[1])
    rotate = history.invoke("control", "rotate-domain-key", proposal_id="aa" * 32)
    history.ok(rotate, version=2, proposal_id="aa" * 32, state_hash=H[2])
    ops["rotate"] = rotate
    for node in NODES:
        history.info("sampler", "status", host=node, version=2, state_hash=H[2])
    history.info("sampler", "status", host="coordinator", version=2, state_hash=H[2])

    final = FinalObservations(
        nodes=list(NODES),
        decrypts={
            encrypt: {n: DecryptObservation(PLAINTEXT) for n in NODES},
            gdk: {n: DecryptObservation(DATA_KEY) for n in NODES},
        },
        keys={"key-a": {n: KeyObservation(True, True) for n in NODES}},
        chain=[ChainEntry(1, H[1], ""), ChainEntry(2, H[2], "aa" * 32)],
        converged_after=0.5,
        heads={n: (2, H[2]) for n in NODES},
        coordinator_head=(2, H[2]),
    )
    return Scenario(history, clock, final, ops)


@pytest.fixture
def run() -> Iterator[Scenario]:
    scenario = healthy_run()
    yield scenario
    scenario.history.close()


def _assert_no_secret(text: str) -> None:
    assert PLAINTEXT.hex() not in text
    assert repr(PLAINTEXT) not in text
    assert DATA_KEY.hex() not in text
    assert b64(PLAINTEXT) not in text
    assert b64(DATA_KEY) not in text


# --- the healthy run --------------------------------------------------------------------------


def test_every_invariant_holds_on_a_healthy_run(run: Scenario) -> None:
    results = check_all(
        run.events(),
        run.history.plaintexts(),
        run.final,
        convergence_bound=10.0,
        min_availability=0.5,
    )
    assert [r.name for r in results] == [
        "ciphertexts-decrypt",
        "decrypts-correct",
        "keys-work",
        "versions-in-chain",
        "versions-monotonic",
        "no-forks",
        "convergence",
        "availability",
    ]
    assert all(r.held for r in results), [r for r in results if not r.held]
    checked = {r.name: r.checked for r in results}
    assert checked["ciphertexts-decrypt"] == 2 * len(NODES)
    assert checked["decrypts-correct"] == 1
    assert checked["keys-work"] == len(NODES)
    assert checked["versions-in-chain"] == 1
    assert checked["versions-monotonic"] == 7


# --- 1. ciphertexts ---------------------------------------------------------------------------


def test_a_node_returning_another_plaintext_breaks_ciphertexts(run: Scenario) -> None:
    decrypts = dict(run.final.decrypts)
    encrypt = run.ops["encrypt"]
    decrypts[encrypt] = {
        **decrypts[encrypt],
        "hsa-2": DecryptObservation(b"not the plaintext"),
    }
    result = check_ciphertexts(
        run.events(), run.history.plaintexts(), replace(run.final, decrypts=decrypts)
    )
    assert not result.held
    assert result.violations == 1
    assert f"op {encrypt} (encrypt by client-0" in result.counterexample
    assert "hsa-2 returned a different plaintext" in result.counterexample
    _assert_no_secret(result.counterexample)


def test_a_node_refusing_an_acknowledged_ciphertext_breaks_ciphertexts(run: Scenario) -> None:
    gdk = run.ops["gdk"]
    decrypts = {
        **run.final.decrypts,
        gdk: {
            "hsa-1": DecryptObservation(DATA_KEY),
            "hsa-2": DecryptObservation(None, "InvalidCiphertextError: invalid ciphertext"),
            # hsa-3 was never asked
        },
    }
    result = check_ciphertexts(
        run.events(), run.history.plaintexts(), replace(run.final, decrypts=decrypts)
    )
    assert not result.held
    assert result.violations == 2
    assert "hsa-2 refused to decrypt it: InvalidCiphertextError" in result.counterexample
    _assert_no_secret(result.counterexample)


def test_an_acknowledged_ciphertext_without_its_plaintext_is_reported(run: Scenario) -> None:
    plaintexts = run.history.plaintexts()
    del plaintexts[run.ops["encrypt"]]
    result = check_ciphertexts(run.events(), plaintexts, run.final)
    assert not result.held
    assert "its plaintext was not kept" in result.counterexample


# --- 2. decrypts during the run ---------------------------------------------------------------


def test_a_wrong_plaintext_during_the_run_breaks_decrypts_correct(run: Scenario) -> None:
    bad = run.history.invoke("client-2", "decrypt", source_op=run.ops["encrypt"])
    run.history.ok(bad, match=False)
    result = check_online_decrypts(run.events())
    assert not result.held
    assert result.checked == 2
    assert f"op {bad} (decrypt by client-2" in result.counterexample
    assert f"ciphertext of op {run.ops['encrypt']}" in result.counterexample


# --- 3. keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        (KeyObservation(False, False, "NotFoundError: no key key-a"), "hsa-3 does not know key"),
        (KeyObservation(True, False, "UnavailableError: x"), "does not round-trip data on hsa-3"),
    ],
)
def test_a_lost_or_broken_key_breaks_keys_work(
    run: Scenario, observation: KeyObservation, expected: str
) -> None:
    keys = {"key-a": {**run.final.keys["key-a"], "hsa-3": observation}}
    result = check_keys(run.events(), replace(run.final, keys=keys))
    assert not result.held
    assert expected in result.counterexample
    assert "key-a" in result.counterexample


def test_an_unchecked_key_breaks_keys_work(run: Scenario) -> None:
    result = check_keys(run.events(), replace(run.final, keys={}))
    assert not result.held
    assert result.violations == len(NODES)


# --- 4. versions in the final chain -----------------------------------------------------------


def test_an_acknowledged_version_missing_from_the_chain_is_broken(run: Scenario) -> None:
    result = check_versions_in_chain(run.events(), replace(run.final, chain=run.final.chain[:1]))
    assert not result.held
    assert "acknowledged as version 2, but the final chain ends at version 1" in (
        result.counterexample
    )


def test_another_proposal_at_an_acknowledged_version_is_broken(run: Scenario) -> None:
    chain = [run.final.chain[0], ChainEntry(2, H[2], "bb" * 32)]
    result = check_versions_in_chain(run.events(), replace(run.final, chain=chain))
    assert not result.held
    assert "the final chain has proposal bbbb" in result.counterexample


def test_another_state_hash_at_an_acknowledged_version_is_broken(run: Scenario) -> None:
    chain = [run.final.chain[0], ChainEntry(2, OTHER, "aa" * 32)]
    result = check_versions_in_chain(run.events(), replace(run.final, chain=chain))
    assert not result.held
    assert "with state hash 0202" in result.counterexample


def test_a_chain_that_does_not_verify_is_broken(run: Scenario) -> None:
    result = check_versions_in_chain(
        run.events(), replace(run.final, chain_error="ForkError: version 2 differs")
    )
    assert not result.held
    assert result.counterexample == "the final chain does not verify: ForkError: version 2 differs"


# --- 5. monotonic versions --------------------------------------------------------------------


@pytest.mark.parametrize("who", ["hsa-2", "coordinator"])
def test_a_version_going_down_is_broken(run: Scenario, who: str) -> None:
    run.history.info("sampler", "status", host=who, version=1, state_hash=H[1])
    run.history.info("sampler", "status", host=who, version=2, state_hash=H[2])
    result = check_monotonic(run.events())
    assert not result.held
    assert result.violations == 1
    assert result.counterexample.startswith(f"{who} was at version 2 at t=")
    assert "and at version 1 at t=" in result.counterexample


# --- 6. forks ---------------------------------------------------------------------------------


def test_two_hashes_for_one_version_in_samples_is_a_fork(run: Scenario) -> None:
    run.history.info("sampler", "status", host="hsa-3", version=2, state_hash=OTHER)
    result = check_no_forks(run.events(), run.final)
    assert not result.held
    assert result.counterexample.startswith("version 2: state 0202")
    assert "state ffff" in result.counterexample
    assert "(hsa-3 at t=" in result.counterexample


def test_an_acknowledged_hash_that_the_chain_contradicts_is_a_fork(run: Scenario) -> None:
    chain = [run.final.chain[0], ChainEntry(2, OTHER, "aa" * 32)]
    result = check_no_forks(run.events(), replace(run.final, chain=chain))
    assert not result.held
    assert "the final chain" in result.counterexample


# --- 7. convergence ---------------------------------------------------------------------------


def test_no_convergence_within_the_bound_is_broken(run: Scenario) -> None:
    late = replace(run.final, converged_after=None, convergence_detail="hsa-2 is at version 1")
    result = check_convergence(late, 10.0)
    assert not result.held
    assert "did not converge within 10 s: hsa-2 is at version 1" in result.counterexample
    assert not check_convergence(replace(run.final, converged_after=12.0), 10.0).held


def test_a_node_on_another_head_is_broken(run: Scenario) -> None:
    heads = {**run.final.heads, "hsa-1": (1, H[1])}
    result = check_convergence(replace(run.final, heads=heads), 10.0)
    assert not result.held
    assert result.counterexample.startswith("hsa-1 ended on version 1")


def test_a_chain_shorter_than_the_coordinators_head_is_broken(run: Scenario) -> None:
    result = check_convergence(replace(run.final, chain=run.final.chain[:1]), 10.0)
    assert not result.held
    assert "the final chain ends at version 1" in result.counterexample


# --- 8. availability --------------------------------------------------------------------------


def _data_op(history: History, phase: str) -> None:
    op = history.invoke("client-0", "encrypt", key_id="k")
    history.complete(op, phase)


def test_availability_counts_only_operations_started_while_an_hsa_was_reachable() -> None:
    clock = FakeClock()
    history = History(clock=clock)
    _data_op(history, "ok")  # t=0.1..0.2: everything up
    history.info("nemesis", "kill", target="hsa-1")
    history.info("nemesis", "pause", target="hsa-2")
    history.info("nemesis", "cut", target="hsa-2", link="coordinator", mode="refuse")
    _data_op(history, "unknown")  # hsa-3 still up: counts
    history.info("nemesis", "cut", target="hsa-3", link="client", mode="blackhole")
    _data_op(history, "unknown")  # nothing reachable: not counted
    _data_op(history, "fail")  # nothing reachable: not counted
    history.info("nemesis", "restore", target="hsa-3", link="client")
    _data_op(history, "fail")  # counts
    history.info("nemesis", "restart", target="hsa-1")
    history.info("nemesis", "resume", target="hsa-2")
    _data_op(history, "ok")
    control = history.invoke("control", "rotate-domain-key")  # not a data-plane operation
    history.unknown(control)

    events = history.events()
    down = down_intervals(events, end=100.0)
    assert set(down) == {"hsa-1", "hsa-2", "hsa-3"}
    assert all(len(spans) == 1 for spans in down.values())

    figures = availability(events, NODES)
    assert figures == AvailabilityFigures(
        attempted=4,
        succeeded=2,
        unknown=1,
        failed=1,
        attempted_all_down=2,
        reachable_seconds=figures.reachable_seconds,
    )
    assert figures.fraction == 0.5
    assert 0 < figures.reachable_seconds < events[-1]["t"]
    assert check_availability(figures, 0.5).held
    broken = check_availability(figures, 0.9)
    assert not broken.held
    assert broken.counterexample == "2 of 4 succeeded (50.0%): 1 unknown, 1 failed"


def test_availability_without_data_plane_operations() -> None:
    empty = AvailabilityFigures(0, 0, 0, 0, 0, 10.0)
    assert empty.fraction is None
    assert not check_availability(empty, 0.9).held
    assert check_availability(empty, 0.9, expected=False).held


def test_a_fault_never_repaired_lasts_until_the_end() -> None:
    history = History(clock=FakeClock())
    history.info("nemesis", "kill", target="hsa-1")
    assert down_intervals(history.events(), end=50.0) == {"hsa-1": [(0.1, 50.0)]}


# --- the history itself -----------------------------------------------------------------------


def test_history_writes_json_lines_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "chaos" / "history.jsonl"
    with History(path, clock=FakeClock()) as history:
        op = history.invoke(
            "client-0", "encrypt", key_id="k", plaintext_sha256=sha256_hex(PLAINTEXT)
        )
        history.remember_plaintext(op, PLAINTEXT)
        history.ok(op, ciphertext=b64(b"blob"))
        gdk = history.invoke("client-0", "generate_data_key", key_id="k")
        history.remember_plaintext(gdk, DATA_KEY)
        history.ok(gdk, ciphertext=b64(b"blob2"), data_key_bytes=len(DATA_KEY))
        history.info("nemesis", "kill", target="hsa-1")
        assert history.counts() == {"invoke": 2, "ok": 2, "fail": 0, "unknown": 0, "info": 1}
        assert history.pending() == 0
    text = path.read_text()
    _assert_no_secret(text)
    events = list(read_history(path))
    assert events == history.events()
    assert [e["phase"] for e in events] == ["invoke", "ok", "invoke", "ok", "info"]
    assert events[0]["t"] < events[1]["t"]
    assert from_b64(events[1]["result"]["ciphertext"]) == b"blob"
    assert all(set(e) == {"t", "id", "process", "op", "phase", "args", "result"} for e in events)
    assert json.loads(text.splitlines()[0])["id"] == op


def test_an_operation_completes_exactly_once() -> None:
    history = History(clock=FakeClock())
    op = history.invoke("client-0", "decrypt")
    with pytest.raises(ValueError, match="completes with one of"):
        history.complete(op, "info")
    history.fail(op, error="NotFoundError")
    with pytest.raises(RuntimeError, match="completed already"):
        history.unknown(op)
    with pytest.raises(RuntimeError, match="not invoked"):
        history.ok(999)


def test_read_history_refuses_a_line_that_is_not_an_event(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text('{"phase": "ok"}\n\n{"phase": "bogus"}\n')
    with pytest.raises(ValueError, match=r"h.jsonl:3 is not a chaos history event"):
        list(read_history(path))


def test_operations_by_outcome_counts_completed_operations(run: Scenario) -> None:
    table = operations_by_outcome(run.events())
    assert table["encrypt"] == {"ok": 1, "fail": 0, "unknown": 1}
    assert table["rotate-domain-key"] == {"ok": 1, "fail": 0, "unknown": 0}
    assert set(table) == {
        "create_key",
        "encrypt",
        "generate_data_key",
        "decrypt",
        "rotate-domain-key",
    }


def test_a_decrypt_observation_does_not_show_its_plaintext() -> None:
    shown: Callable[[object], str] = repr
    assert PLAINTEXT.hex() not in shown(DecryptObservation(PLAINTEXT))
    assert repr(PLAINTEXT) not in shown(DecryptObservation(PLAINTEXT))

"""Verification cost of the chain of domain states, against chain length and operators.

Pure and in-process (no servers): chains are built here with `domain_core` exactly as honest
HSAs build them (genesis ceremony, then rotate-domain-key proposals approved by a quorum,
`transition.next_manifest`, `sealing.seal_state`), serialized, and then verified as a node
that receives them does: every state parsed from its bytes (`SealedState.from_bytes`, fresh
objects each time, so no cached hash or parsed key helps) and fed to `TrustedChain`.

- Chain length: 10, 100 and 1,000 states (3 operators, quorum 2, 3 hosts). Each successor
  state costs the producer's signature, two approvals and the recomputed transition.
- Operators: 3, 16 and 64 operators, with quorum a majority (2, 9, 33) and, to tell the cost
  of the operator list from that of the approvals, with quorum 2; 10 successor states, each
  with a quorum of approvals, timed on a chain whose operators were added first (one genesis
  proposal holds at most 64 changes, so operators beyond three join by an approved proposal).
Times are the verifying thread's CPU time (`time.thread_time`), not wall-clock time, so other
processes on a shared machine do not inflate them.
Operators sign with Ed25519, as `hsm-domain init` makes them. Each figure is the best of
many runs, the sizes interleaved round by round (5 rounds of about 1,000 states per chain
length; 10 rounds per operator count), so a burst of load on the machine hits all sizes alike.
Growth is summarised by the exponent b of a log-log fit (cost ~ n**b): 1 is linear; the
targets (issue 7) ask for no worse than linear. Quick mode: chains of 10 and 100 states, 3
and 16 operators, fewer runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeVar, cast

from bench._core import BenchConfig, Curve, Figure, Target
from bench._stats import loglog_exponent
from domain_core import crypto, genesis, model, quorum, sealing, transition
from domain_core.chain import TrustedChain
from domain_core.changes import add_operator, rotate_domain_key, set_quorum
from domain_core.enrollment import make_enrollment
from domain_core.identity import HostIdentity
from domain_core.model import Proposal, SealedState
from domain_core.pki import DomainCA
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_proto import domain_pb2

NAME: Final = "verification"
TITLE: Final = "chain verification cost vs chain length and operators (in-process)"
TARGETS: Final = (
    Target(
        "verification_chain_growth_exponent",
        "<=",
        1.15,
        "verification grows linearly with chain length (log-log exponent <= 1.15)",
    ),
    Target(
        "verification_operators_growth_exponent",
        "<=",
        1.15,
        "verification grows no worse than linearly with operators (exponent <= 1.15)",
    ),
)

DOMAIN_ID: Final = "bench"
START_TIME: Final = 1_767_225_600  # 2026-01-01T00:00:00Z; the chain's own clock
HOSTS: Final = 3
SUCCESSORS_PER_OPERATOR_CHAIN: Final = 10

_K = TypeVar("_K")

__all__ = ["NAME", "TARGETS", "TITLE", "ChainBuilder", "VerifyTiming", "run", "time_verification"]


@dataclass
class _Host:
    host_id: str
    signer: InMemorySigner
    agreement_private_key: bytes = field(repr=False)
    record: domain_pb2.Host


@dataclass
class ChainBuilder:
    """A domain's keys and its chain, grown one approved rotate-domain-key at a time."""

    operators: list[InMemorySigner]
    threshold: int
    hosts: list[_Host]
    states: list[SealedState] = field(default_factory=list)
    keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    now: int = START_TIME

    @classmethod
    def create(cls, operators: int, threshold: int, hosts: int = HOSTS) -> ChainBuilder:
        """Run the genesis ceremony: every operator approves, hsa-1 seals."""
        host_list = []
        enrollments = []
        at = datetime.fromtimestamp(START_TIME, UTC)
        ca = DomainCA.create(DOMAIN_ID, now=at)
        for index in range(1, hosts + 1):
            identity = HostIdentity.generate(f"hsa-{index}")
            certificate = ca.issue(identity.spiffe_id(DOMAIN_ID), identity.tls_public_key, now=at)
            raw = make_enrollment(identity, DOMAIN_ID, certificate)
            enrollments.append(raw)
            record = model.parse_enrollment(raw, DOMAIN_ID)[1]
            signer = cast(InMemorySigner, identity.signer)
            host_list.append(
                _Host(identity.host_id, signer, identity.agreement_private_key, record)
            )
        signers = [InMemorySigner.generate(SignatureAlgorithm.ED25519) for _ in range(operators)]
        builder = cls(operators=signers, threshold=threshold, hosts=host_list)
        records = [model.make_operator(f"op{i}", s.public_key) for i, s in enumerate(signers)]
        proposal = genesis.genesis_proposal(
            DOMAIN_ID,
            enrollments,
            records,
            threshold,
            ca_certificate=ca.certificate_der,
            proposer_id=records[0].operator_id,
            now=builder.now,
        )
        approvals = [quorum.approve(proposal, s) for s in signers]
        producer = host_list[0]
        state = genesis.seal_genesis(
            proposal,
            approvals,
            producer_host_id=producer.host_id,
            producer=producer.signer,
            now=builder.now,
        )
        builder.states.append(state)
        builder.keys = sealing.unseal_state(state, producer.host_id, producer.agreement_private_key)
        return builder

    def extend(self, count: int) -> None:
        """Append `count` states, each a rotate-domain-key approved by a quorum."""
        for _ in range(count):
            self._append([rotate_domain_key()])

    def _append(self, changes: list[domain_pb2.Change]) -> None:
        """Propose `changes`, approve by the first `threshold` operators, seal as hsa-1."""
        producer = self.hosts[0]
        head = self.states[-1]
        self.now += 1
        proposal = Proposal.create(
            domain_id=DOMAIN_ID,
            base_version=head.version,
            base_state_hash=head.hash,
            changes=changes,
            proposer_id=self.operators[0].public_key.key_id,
            created_at=self.now,
            expires_at=self.now + 3600,
            nonce=crypto.random_bytes(model.NONCE_BYTES),
        )
        approvals = [quorum.approve(proposal, s) for s in self.operators[: self.threshold]]
        manifest, _ = transition.next_manifest(
            transition.StateHead(head.manifest, head.hash), proposal, approvals, now=self.now
        )
        self.keys = sealing.next_domain_keys(self.keys, manifest)
        state = sealing.seal_state(
            manifest,
            self.keys,
            producer_host_id=producer.host_id,
            producer=producer.signer,
            proposal=proposal,
            approvals=approvals,
        )
        self.states.append(state)

    def add_operators(self, total: int, threshold: int) -> None:
        """One approved proposal that adds operators up to `total` and sets the threshold."""
        new = [
            InMemorySigner.generate(SignatureAlgorithm.ED25519)
            for _ in range(total - len(self.operators))
        ]
        first = len(self.operators)
        changes = [
            add_operator(model.make_operator(f"op{first + i}", s.public_key))
            for i, s in enumerate(new)
        ]
        self._append([*changes, set_quorum(threshold)])
        self.operators += new
        self.threshold = threshold

    def serialized(self) -> list[bytes]:
        """Every state's bytes, genesis first (what a node receives or stores)."""
        return [s.to_bytes() for s in self.states]


def _clock() -> float:
    """CPU seconds of this thread: verification is pure computation, and on a shared machine
    wall-clock time would also count the time other processes held the cores."""
    return time.thread_time()


@dataclass(frozen=True)
class VerifyTiming:
    """Seconds to parse and verify the genesis state, and then the timed successor states."""

    genesis_s: float
    successors_s: float

    @property
    def total_s(self) -> float:
        return self.genesis_s + self.successors_s


def time_verification(
    raw_states: list[bytes], genesis_hash: bytes, repeats: int, *, timed_from: int = 1
) -> VerifyTiming:
    """Best-of-`repeats` time to parse and verify the chain from its bytes, as a node does.

    States before index `timed_from` (after genesis) are verified but not timed, so the cost
    of the states from there on can be measured on a chain that was set up first.
    """
    best: VerifyTiming | None = None
    for _ in range(repeats):
        began = _clock()
        chain = TrustedChain.from_genesis(
            DOMAIN_ID, genesis_hash, SealedState.from_bytes(raw_states[0])
        )
        genesis_s = _clock() - began
        for raw in raw_states[1:timed_from]:
            chain.update(SealedState.from_bytes(raw))
        began = _clock()
        for raw in raw_states[timed_from:]:
            if not chain.update(SealedState.from_bytes(raw)):
                raise RuntimeError("a state of the benchmark chain did not advance the chain")
        timing = VerifyTiming(genesis_s, _clock() - began)
        if best is None or timing.total_s < best.total_s:
            best = timing
    assert best is not None
    return best


def _parse_only_s(raw_states: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = _clock()
        for raw in raw_states:
            SealedState.from_bytes(raw)
        best = min(best, _clock() - began)
    return best


def _keep_best(best: dict[_K, VerifyTiming], key: _K, timing: VerifyTiming) -> None:
    if key not in best or timing.total_s < best[key].total_s:
        best[key] = timing


def _chain_lengths(config: BenchConfig, figures: dict[str, Figure]) -> None:
    lengths: tuple[int, ...] = config.pick((10, 100), (10, 100, 1000))
    rounds = int(config.pick(2, 5))
    # Each round verifies about this many states per chain length (many runs of a short
    # chain, one of the longest), the lengths interleaved, so that a burst of load on a shared
    # machine does not land on one length only; the best run of all rounds counts.
    states_per_round = int(config.pick(300, 1000))
    builder = ChainBuilder.create(operators=3, threshold=2)
    built = time.perf_counter()
    builder.extend(max(lengths) - 1)
    config.log(f"   built a chain of {max(lengths)} states in {time.perf_counter() - built:.1f} s")
    raws = builder.serialized()
    genesis_hash = builder.states[0].hash
    best: dict[int, VerifyTiming] = {}
    parse_best: dict[int, float] = {}
    for _ in range(rounds):
        for length in lengths:
            runs = max(1, states_per_round // length)
            _keep_best(best, length, time_verification(raws[:length], genesis_hash, runs))
            parse = _parse_only_s(raws[:length], runs)
            parse_best[length] = min(parse_best.get(length, parse), parse)
    totals_ms = [best[n].total_s * 1000 for n in lengths]
    successors_ms = [best[n].successors_s * 1000 for n in lengths]
    for length in lengths:
        prefix = f"verification_chain_{length}"
        figures[f"{prefix}_total_ms"] = best[length].total_s * 1000
        figures[f"{prefix}_per_state_us"] = best[length].successors_s * 1e6 / (length - 1)
        figures[f"{prefix}_parse_per_state_us"] = parse_best[length] * 1e6 / length
    figures["verification_chain_growth_exponent"] = loglog_exponent(
        [n - 1.0 for n in lengths], successors_ms
    )
    first = float(figures[f"verification_chain_{lengths[0]}_per_state_us"])
    last = float(figures[f"verification_chain_{lengths[-1]}_per_state_us"])
    figures["verification_chain_per_state_ratio_longest_to_shortest"] = last / first
    xs = [float(n) for n in lengths]
    reference = [totals_ms[0] * n / lengths[0] for n in lengths]
    config.add_curve(
        "verification_chain_length",
        Curve(
            title="Verifying a chain from genesis (3 operators, quorum 2)",
            x_label="states in the chain",
            y_label="ms to parse and verify",
            series={"measured": (xs, totals_ms), "linear from the first point": (xs, reference)},
            log_x=True,
            log_y=True,
        ),
    )


def _operator_counts(config: BenchConfig, figures: dict[str, Figure]) -> None:
    counts: tuple[int, ...] = config.pick((3, 16), (3, 16, 64))
    rounds = int(config.pick(3, 10))
    labels: dict[str, Callable[[int], int]] = {
        "majority": lambda n: n // 2 + 1,
        "quorum 2": lambda n: 2,
    }
    chains: dict[tuple[int, str], tuple[list[bytes], bytes, int]] = {}
    for operators in counts:
        for label, threshold_of in labels.items():
            threshold = threshold_of(operators)
            # A genesis proposal holds at most 64 changes, so the operators beyond the first
            # three join through one approved add-operator proposal, as in a real domain.
            builder = ChainBuilder.create(operators=3, threshold=2)
            if operators > 3 or threshold != 2:
                builder.add_operators(operators, threshold)
            setup = len(builder.states)
            builder.extend(SUCCESSORS_PER_OPERATOR_CHAIN)
            chains[(operators, label)] = (builder.serialized(), builder.states[0].hash, setup)
    best: dict[tuple[int, str], VerifyTiming] = {}
    for _ in range(rounds):  # interleaved, best of all rounds (see _chain_lengths)
        for key, (raws, genesis_hash, setup) in chains.items():
            _keep_best(best, key, time_verification(raws, genesis_hash, 2, timed_from=setup))
    series: dict[str, list[float]] = {label: [] for label in labels}
    for operators in counts:
        prefix = f"verification_operators_{operators}"
        for label, threshold_of in labels.items():
            per_state = best[(operators, label)].successors_s * 1e6 / SUCCESSORS_PER_OPERATOR_CHAIN
            series[label].append(per_state)
            if label == "majority":
                threshold = threshold_of(operators)
                figures[f"{prefix}_threshold"] = threshold
                figures[f"{prefix}_per_state_us"] = per_state
                figures[f"{prefix}_per_approval_us"] = per_state / threshold
            else:
                figures[f"{prefix}_quorum2_per_state_us"] = per_state
    xs = [float(n) for n in counts]
    figures["verification_operators_growth_exponent"] = loglog_exponent(xs, series["majority"])
    figures["verification_operators_quorum2_growth_exponent"] = loglog_exponent(
        xs, series["quorum 2"]
    )
    config.add_curve(
        "verification_operators",
        Curve(
            title="Verifying one state vs operators",
            x_label="operators in the domain",
            y_label="µs to parse and verify one state",
            series={
                "quorum: a majority of operators": (xs, series["majority"]),
                "quorum: 2 operators": (xs, series["quorum 2"]),
            },
            log_x=True,
            log_y=True,
        ),
    )


def run(config: BenchConfig) -> dict[str, Figure]:
    """Verification cost against chain length and against the number of operators."""
    figures: dict[str, Figure] = {}
    _chain_lengths(config, figures)
    _operator_counts(config, figures)
    return figures

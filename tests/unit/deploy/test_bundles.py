"""A domain across hosts (`hsm-domain init --host ... --coordinator ...`): the addresses, the
bundles, their certificates and modes, and the tools' way to the domain from the ceremony
directory. The netns test (tests/netns) runs such a domain on machines of its own."""

from __future__ import annotations

import ipaddress
import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from deploy import cli
from deploy.init import add_node_across_hosts, init_domain_across_hosts, load_layout
from domain_core.errors import AlreadyExistsError, InvalidInputError
from domain_edge.config import FLOORS_COMPLETE_FILE, CoordinatorConfig, NodeConfig
from domain_edge.hosts import HostAddress, addresses_of, parse_host_option
from domain_edge.kms_client import read_cluster
from domain_edge.layout import DomainPaths

pytestmark = pytest.mark.unit

_NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
_HOSTS = [
    ("hsa-1", HostAddress.parse("10.0.0.11", 7700)),
    ("hsa-2", HostAddress.parse("hsa-2.example.net", 7700)),
    ("hsa-3", HostAddress.parse("[fd00::13]:7800", 7700)),
]


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_domain_across_hosts(
        tmp_path_factory.mktemp("hosts") / "domain",
        _HOSTS,
        HostAddress.parse("coordinator.example.net", 7710),
        now=_NOW,
        scrypt_n=2**14,
    )


@pytest.mark.parametrize(
    ("text", "host", "port", "listen"),
    [
        ("10.0.0.1", "10.0.0.1", 7700, "10.0.0.1:7700"),
        ("10.0.0.1:9000", "10.0.0.1", 9000, "10.0.0.1:9000"),
        ("HSA-1.Example.NET.", "hsa-1.example.net", 7700, "0.0.0.0:7700"),
        ("fd00::1", "fd00::1", 7700, "[fd00::1]:7700"),
        ("[fd00::1]:81", "fd00::1", 81, "[fd00::1]:81"),
        ("[FD00::1]", "fd00::1", 7700, "[fd00::1]:7700"),
    ],
)
def test_an_address_is_an_ip_bound_as_is_or_a_name_listened_for_everywhere(
    text: str, host: str, port: int, listen: str
) -> None:
    address = HostAddress.parse(text, 7700)
    assert (address.host, address.port, address.listen()) == (host, port, listen)
    assert address.is_ip == (listen != "0.0.0.0:7700")


@pytest.mark.parametrize(
    "text",
    ["", "host:0", "host:65536", "host:x", "*.example.net", "a..b", "-a.example", "10.0.0",
     "[fd00::1", "[fd00::1]x", "fd00::zz", "a_b.example", "x" * 64 + ".example", "1.2.3.4:"],
)  # fmt: skip
def test_a_malformed_address_is_refused_with_its_reason(text: str) -> None:
    with pytest.raises(InvalidInputError):
        HostAddress.parse(text, 7700)


def test_a_host_option_is_name_equals_address() -> None:
    assert parse_host_option("hsa-9=10.1.2.3:7001") == ("hsa-9", HostAddress("10.1.2.3", 7001))
    for text in ("hsa-9", "=10.0.0.1", "hsa-9=", "hsa-9=bad host"):
        with pytest.raises(InvalidInputError):
            parse_host_option(text)


def test_every_bundle_is_self_contained_private_and_names_its_address(domain: Path) -> None:
    paths = DomainPaths(domain)
    assert not paths.nodes_dir.exists()
    assert not paths.coordinator_dir.exists()
    for name, address in _HOSTS:
        bundle = paths.bundle_dir(name)
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
        config = NodeConfig.load(bundle / "config.json")
        for relative in (config.identity_dir, config.data_dir, config.genesis_state,
                         config.tls.ca, config.tls.cert, config.tls.key):  # fmt: skip
            assert (bundle / relative).exists()
            assert not Path(relative).is_absolute()
        for key in (bundle / "identity").glob("*.key"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert config.listen == address.listen()
        assert config.advertise_address == ("" if address.is_ip else address.address)
        assert config.coordinator == "coordinator.example.net:7710"
        assert config.metrics_listen == f"127.0.0.1:{address.port + 2000}"
        assert config.coordinator_fingerprints, "the coordinator's certificate is pinned"
        names = _certificate_names(bundle / config.tls.cert)
        assert names == ({address.host}, set()) or names == (set(), {address.host})
    coordinator = CoordinatorConfig.load(paths.bundle_dir("coordinator") / "config.json")
    assert (coordinator.listen, coordinator.operator_listen) == ("0.0.0.0:7710", "0.0.0.0:7711")
    assert _certificate_names(paths.bundle_dir("coordinator") / "tls.crt") == (
        {"coordinator.example.net"},
        set(),
    )


def _certificate_names(path: Path) -> tuple[set[str], set[str]]:
    """The DNS names (other than the SPIFFE-derived ones) and IP addresses a cert carries."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = {n for n in san.get_values_for_type(x509.DNSName) if not n.endswith(".local")}
    ips = {str(ipaddress.ip_address(a)) for a in san.get_values_for_type(x509.IPAddress)}
    return dns - {"hsa.local", "coordinator.local"}, ips


def test_the_tools_reach_the_domain_from_the_ceremony_directory(domain: Path) -> None:
    addresses = addresses_of(DomainPaths(domain))
    assert addresses is not None
    assert addresses.operator == "coordinator.example.net:7711"
    endpoints, _ = read_cluster(domain)
    assert endpoints == ["10.0.0.11:7700", "hsa-2.example.net:7700", "[fd00::13]:7800"]


def test_hsm_domain_refuses_to_run_a_domain_across_hosts_locally(domain: Path) -> None:
    with pytest.raises(InvalidInputError, match="across hosts"):
        load_layout(domain)


@pytest.mark.parametrize(
    ("hosts", "coordinator", "words"),
    [
        ([("hsa-1", "10.0.0.1"), ("hsa-1", "10.0.0.2")], "10.0.0.9", "twice"),
        ([("hsa-1", "10.0.0.1"), ("hsa-2", "10.0.0.1")], "10.0.0.9", "both listen"),
        ([("hsa-1", "10.0.0.1:7711")], "10.0.0.1", "both listen"),
        ([("hsa-1", "10.0.0.1:9710")], "10.0.0.1:7710", "both listen"),
        ([("hsa-1", "10.0.0.1:64000")], "10.0.0.9", "too high"),
        ([("Bad Name", "10.0.0.1")], "10.0.0.9", "host id"),
    ],
)
def test_addresses_that_cannot_all_listen_are_refused_before_anything_is_written(
    tmp_path: Path, hosts: list[tuple[str, str]], coordinator: str, words: str
) -> None:
    parsed = [(name, HostAddress.parse(address, 7700)) for name, address in hosts]
    with pytest.raises(InvalidInputError, match=words):
        init_domain_across_hosts(
            tmp_path / "d", parsed, HostAddress.parse(coordinator, 7710), scrypt_n=2**14
        )
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--host", "hsa-1=10.0.0.1"], "--coordinator"),
        (["--coordinator", "10.0.0.9"], "--host"),
        (["--host", "hsa-1=10.0.0.1", "--coordinator", "10.0.0.9", "--nodes", "5"], "--nodes"),
        (["--host", "hsa-1=10.0.0.1", "--coordinator", "10.0.0.9", "--store", "etcd"], "SQLite"),
        (["--host", "hsa-1", "--coordinator", "10.0.0.9"], "NAME=ADDRESS"),
    ],
)
def test_init_across_hosts_refuses_options_that_do_not_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], words: str
) -> None:
    assert cli.main(["init", str(tmp_path / "d"), *arguments]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_init_across_hosts_prints_each_bundle_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--host", "a=10.0.0.1", "--host", "b=10.0.0.2", "--coordinator", "10.0.0.9"]
    assert cli.main(["init", str(tmp_path / "d"), *arguments, "--expose-metrics", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["bundles"]) == {"a", "b", "coordinator"}
    assert printed["addresses"]["operator"] == "10.0.0.9:7711"
    config = NodeConfig.load(Path(printed["bundles"]["a"]) / "config.json")
    assert config.metrics_listen == "10.0.0.1:9700"


def test_a_host_added_later_gets_a_bundle_like_the_others(tmp_path: Path) -> None:
    root = init_domain_across_hosts(
        tmp_path / "d",
        _HOSTS[:1],
        HostAddress.parse("10.0.0.10", 7710),
        now=_NOW,
        scrypt_n=2**14,
        workers=2,
        expose_metrics=True,
    )
    enrollment = add_node_across_hosts(root, "hsa-4", HostAddress.parse("hsa-4.example.net", 7700))
    bundle = enrollment.parent
    assert bundle == DomainPaths(root).bundle_dir("hsa-4")
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    config = NodeConfig.load(bundle / "config.json")
    first = NodeConfig.load(DomainPaths(root).bundle_dir("hsa-1") / "config.json")
    assert (config.coordinator, config.coordinator_fingerprints, config.key_service_workers) == (
        first.coordinator,
        first.coordinator_fingerprints,
        2,
    )
    assert (config.listen, config.advertise_address, config.metrics_listen) == (
        "0.0.0.0:7700",
        "hsa-4.example.net:7700",
        "0.0.0.0:9700",
    )
    assert not (bundle / "data" / FLOORS_COMPLETE_FILE).exists(), "it learns floors from peers"
    assert (DomainPaths(root).bundle_dir("hsa-1") / "data" / FLOORS_COMPLETE_FILE).exists()
    endpoints, _ = read_cluster(root)
    assert endpoints == ["10.0.0.11:7700", "hsa-4.example.net:7700"]
    with pytest.raises(AlreadyExistsError):
        add_node_across_hosts(root, "hsa-4", HostAddress.parse("10.0.0.14", 7700))
    with pytest.raises(InvalidInputError, match="both listen"):
        add_node_across_hosts(root, "hsa-5", HostAddress.parse("10.0.0.11", 7700))
    assert not DomainPaths(root).bundle_dir("hsa-5").exists()
    assert not DomainPaths(root).nodes_dir.exists()

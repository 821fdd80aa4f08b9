"""The container deployment files (issue 17): Docker Compose and Kubernetes, checked offline.

Compose: `deploy/compose/compose.yaml` validates against the Compose Specification's JSON
schema (vendored in check-jsonschema, `--builtin-schema vendor.compose-spec`), every path it
names exists, every service runs unprivileged and hardened, each process mounts only its own
volume, and only loopback ports are published. The Dockerfile and `.dockerignore` are read for
their essentials (Docker cannot build here), and `init-domain.sh` runs for real on scratch
directories with a stand-in `hsm-domain`.

Kubernetes: every manifest under `deploy/k8s/` validates strictly with kubernetes-validate
against a fixed Kubernetes version it ships (no network), and the security-relevant facts are
checked one by one: non-root, read-only, no capabilities; the bundles Secret only in the init
containers, and optional; the coordinator's HSA port reachable from HSA pods only; the headless
Service publishing not-ready addresses; the init containers' script extracting a real tar.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
INIT_SCRIPT = COMPOSE_DIR / "init-domain.sh"
K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes the manifests are for; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "hsm-domain"
STATE = "/var/lib/hsm-domain"
UID = 10001
PROCESSES = ("coordinator", "hsa-1", "hsa-2", "hsa-3")
HSA_LABELS = {"app.kubernetes.io/name": "hsm-domain", "app.kubernetes.io/component": "hsa"}
COORDINATOR_LABELS = {
    "app.kubernetes.io/name": "hsm-domain",
    "app.kubernetes.io/component": "coordinator",
}
Doc = dict[str, Any]
RequireTool = Callable[[str, str], str]


def _console_script(name: str, why: str, require_tool: RequireTool) -> str:
    """A console script of this venv (installed with the test extras), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool(name, why)


@pytest.fixture
def check_jsonschema(require_tool: RequireTool) -> str:
    return _console_script("check-jsonschema", "validate compose.yaml", require_tool)


@pytest.fixture
def kubernetes_validate(require_tool: RequireTool) -> str:
    return _console_script("kubernetes-validate", "validate the manifests", require_tool)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False, **kwargs
    )  # fmt: skip


def _compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


def _console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


# --- Compose -------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(check_jsonschema: str) -> None:
    result = _run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_compose_file_off_the_specification_is_caught(
    check_jsonschema: str, tmp_path: Path
) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("  cap_drop:", "  cap_dorp:"))
    result = _run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert result.returncode == 1
    assert "'cap_dorp' was unexpected" in result.stdout  # the check above can fail


def test_every_path_the_compose_file_names_exists() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        build = service["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == REPO, name  # the context is the repository root (.dockerignore)
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, (name, volume)  # named volumes only, no bind mount
    assert (REPO / ".dockerignore").is_file()
    assert os.access(INIT_SCRIPT, os.X_OK)


def test_each_process_mounts_only_its_own_volume() -> None:
    services = _compose()["services"]
    for name in PROCESSES:
        assert services[name]["volumes"] == [f"{name}:{STATE}"], name
        install = f"install-{name}"
        assert services[name]["depends_on"][install] == {
            "condition": "service_completed_successfully"
        }
        assert services[install]["volumes"] == ["ceremony:/ceremony", f"{name}:{STATE}"]
        assert services[install]["command"] == ["init-domain.sh", "install", name]
        assert services[install]["depends_on"] == {
            "init": {"condition": "service_completed_successfully"}
        }
    assert services["init"]["volumes"] == ["ceremony:/ceremony"]
    assert services["init"]["command"] == ["init-domain.sh", "ceremony"]
    holding_ceremony = {n for n, s in services.items() if "ceremony:/ceremony" in s["volumes"]}
    assert holding_ceremony == {"init", "tools"} | {f"install-{n}" for n in PROCESSES}


def test_every_compose_service_is_unprivileged_and_hardened() -> None:
    for name, service in _compose()["services"].items():
        assert service["user"] == f"{UID}:{UID}", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "cap_add" not in service, name
        assert "privileged" not in service, name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert [t.split(":")[0] for t in service["tmpfs"]] == ["/tmp"], name
        one_shot = name == "init" or name.startswith("install-")
        assert (service.get("network_mode") == "none") == one_shot, name  # no network to keys
        if not one_shot:
            assert service["networks"] == ["hsm-domain"], name


def test_only_loopback_ports_are_published_and_never_the_hsa_only_port() -> None:
    published = []
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            host_ip, _, target = port.split(":")
            assert host_ip == "127.0.0.1", (name, port)
            published.append((name, int(target)))
    assert ("coordinator", 7711) in published  # operators reach the coordinator from the host
    assert all(target not in (7700, 7710) for _, target in published)


def test_compose_commands_are_the_packages_console_scripts() -> None:
    scripts = _console_scripts()
    services = _compose()["services"]
    for name in PROCESSES:
        program = "domain-coordinator" if name == "coordinator" else "hsa-node"
        command = services[name]["command"]
        assert command == [program, "--config", f"{STATE}/config.json", "--log-format", "json"]
        assert program in scripts
        port = 9710 if name == "coordinator" else 9700
        assert f"http://127.0.0.1:{port}/metrics" in " ".join(services[name]["healthcheck"]["test"])
    assert services["tools"]["profiles"] == ["tools"]  # never started by `up`
    assert services["tools"]["command"][0] in scripts
    assert services["tools"]["environment"] == {"HSM_CLUSTER": "/ceremony/domain"}


def test_the_image_runs_unprivileged_and_holds_no_secret() -> None:
    lines = [
        line.strip() for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]  # fmt: skip
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms == ["python:3.11-slim-bookworm", "python:3.11-slim-bookworm"]
    assert [line for line in lines if line.startswith("USER ")] == [f"USER {UID}:{UID}"]
    assert lines.index(f"USER {UID}:{UID}") > max(
        i for i, line in enumerate(lines) if line.startswith(("RUN ", "COPY "))
    )  # nothing runs as root after the user is set, and the last word is the user's
    text = DOCKERFILE.read_text()
    assert f"--uid {UID} --gid {UID}" in text
    assert f"install -d -o {UID} -g {UID} -m 0700 {STATE} /ceremony" in text
    assert "pip install --no-cache-dir ." in text
    assert "[test]" not in text
    copied = []
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = [w for w in line.split()[1:] if not w.startswith("--")]
            copied.extend(sources)
    assert not {".", "./"} & set(copied)  # no wholesale copy of the context
    for source in copied:
        assert (REPO / source).exists(), source
        assert not source.startswith((".venv", ".git", "hsm-cluster", "tests")), source
    for port in (7700, 7710, 7711, 9700, 9710):
        assert str(port) in next(line for line in lines if line.startswith("EXPOSE "))


def test_the_build_context_leaves_out_everything_but_the_sources() -> None:
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    assert patterns[0] == "*"  # everything is left out unless let in below
    let_in = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    allowed = {p.rstrip("*") for p in packages["packages"]["find"]["include"]}
    assert let_in == allowed | {"pyproject.toml", "README.md"}
    for secret in (".venv", ".git", "hsm-cluster", "**/__pycache__", "**/*.key", "**/bundles"):
        assert secret in patterns, secret


def _fake_bundle(bundle: Path) -> None:
    (bundle / "identity").mkdir(parents=True, mode=0o700)
    (bundle / "data").mkdir(mode=0o700)
    (bundle / "identity" / "tls.key").write_text("private")
    (bundle / "identity" / "tls.key").chmod(0o600)
    (bundle / "ca.crt").write_text("ca")
    (bundle / "config.json").write_text("{}")


@pytest.fixture
def scratch_domain(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A ceremony directory with an installed-looking domain, an empty state directory, and
    the environment pointing init-domain.sh at them."""
    ceremony, state = tmp_path / "ceremony" / "domain", tmp_path / "state"
    state.mkdir(mode=0o700)
    _fake_bundle(ceremony / "bundles" / "hsa-1")
    env = {**os.environ, "HSM_CEREMONY_DIR": str(ceremony), "HSM_STATE_DIR": str(state)}
    return ceremony, state, env


def test_init_script_moves_a_bundle_into_its_volume_once(
    scratch_domain: tuple[Path, Path, dict[str, str]],
) -> None:
    ceremony, state, env = scratch_domain
    installed = _run(["sh", str(INIT_SCRIPT), "install", "hsa-1"], env=env)
    assert installed.returncode == 0, installed.stderr
    assert (state / "config.json").read_text() == "{}"
    assert (state / "identity" / "tls.key").read_text() == "private"
    assert (state / "identity" / "tls.key").stat().st_mode & 0o777 == 0o600
    assert (state / "identity").stat().st_mode & 0o777 == 0o700
    assert not (ceremony / "bundles" / "hsa-1").exists()  # the host key now exists once
    again = _run(["sh", str(INIT_SCRIPT), "install", "hsa-1"], env=env)
    assert again.returncode == 0
    assert "already installed" in again.stderr
    empty = state.parent / "empty"
    empty.mkdir()
    missing = _run(
        ["sh", str(INIT_SCRIPT), "install", "hsa-2"], env={**env, "HSM_STATE_DIR": str(empty)}
    )
    assert missing.returncode == 1
    assert "docker compose down -v" in missing.stderr
    assert list(empty.iterdir()) == []


def test_init_script_creates_the_domain_with_the_compose_addresses_once(
    scratch_domain: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    ceremony, _, env = scratch_domain
    shutil.rmtree(ceremony)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "hsm-domain"  # records its arguments, and makes domain.json as init would
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" >> {calls}\n'
        'mkdir -p "$2" && echo {} > "$2/domain.json"\n'
    )
    fake.chmod(0o755)
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}"}
    for _ in range(2):
        result = _run(["sh", str(INIT_SCRIPT), "ceremony"], env=env)
        assert result.returncode == 0, result.stderr
    expected = ["init", str(ceremony)]
    for host in ("hsa-1", "hsa-2", "hsa-3"):
        expected += ["--host", f"{host}={host}"]
    expected += ["--coordinator", "coordinator", "--expose-metrics"]
    assert calls.read_text().splitlines() == expected  # once: the second run found the domain
    assert _run(["sh", str(INIT_SCRIPT), "bogus"], env=env).returncode == 2


# --- Kubernetes ----------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _objects() -> list[Doc]:
    return [
        doc for path in _manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def _object(kind: str, name: str) -> Doc:
    return next(o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name)


def _pod(statefulset: str) -> Doc:
    spec: Doc = _object("StatefulSet", statefulset)["spec"]["template"]["spec"]
    return spec


def test_manifests_validate_strictly_offline(kubernetes_validate: str) -> None:
    files = [str(p) for p in _manifest_files()]
    result = _run([kubernetes_validate, "--strict", "-k", KUBERNETES_VERSION, *files])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARN" not in output, output
    assert "ERROR" not in output, output
    assert output.count("passed for resource") == len(_objects())


def test_a_manifest_off_the_schema_is_caught(kubernetes_validate: str, tmp_path: Path) -> None:
    broken = tmp_path / "pdb.yaml"
    broken.write_text((K8S / "pdb.yaml").read_text().replace("maxUnavailable", "maxUnavailabel"))
    result = _run([kubernetes_validate, "--strict", "-k", KUBERNETES_VERSION, str(broken)])
    assert result.returncode != 0
    assert "maxUnavailabel" in result.stdout + result.stderr


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _manifest_files()} - {"secrets.example.yaml"}
    assert [image["name"] for image in kustomization["images"]] == ["hsm-domain"]


def test_every_object_is_labelled_and_in_the_namespace() -> None:
    for obj in _objects():
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/name"] == "hsm-domain", meta["name"]
        if obj["kind"] != "Namespace":
            assert meta["namespace"] == NAMESPACE, meta["name"]
    namespace = _object("Namespace", NAMESPACE)["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    assert _object("StatefulSet", "hsa")["spec"]["template"]["metadata"]["labels"] == HSA_LABELS
    coordinator = _object("StatefulSet", "coordinator")["spec"]["template"]["metadata"]
    assert coordinator["labels"] == COORDINATOR_LABELS


@pytest.mark.parametrize("statefulset", ["hsa", "coordinator"])
def test_every_container_runs_unprivileged(statefulset: str) -> None:
    pod = _pod(statefulset)
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (UID, UID, UID)
    assert context["fsGroupChangePolicy"] == "OnRootMismatch"  # keeps key files 0600
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    scripts = _console_scripts()
    for container in pod["initContainers"] + pod["containers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert container["image"].split(":")[0] == "hsm-domain", container["name"]
        assert {"requests", "limits"} <= set(container["resources"]), container["name"]
    (main,) = pod["containers"]
    assert main["command"][0] in scripts
    assert main["command"][1:] == ["--config", f"{STATE}/config.json", "--log-format", "json"]


@pytest.mark.parametrize(
    ("statefulset", "secret", "port"),
    [("hsa", "hsa-bundles", 9700), ("coordinator", "coordinator-bundle", 9710)],
)
def test_only_the_init_container_reads_the_optional_bundle_secret(
    statefulset: str, secret: str, port: int
) -> None:
    pod = _pod(statefulset)
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    ((volume, source),) = secrets.items()
    assert source["secretName"] == secret
    assert source["optional"] is True  # deleted once every pod has started
    assert source["defaultMode"] == 0o440
    (init,) = pod["initContainers"]
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert mounts[volume] == {"name": volume, "mountPath": "/bundles", "readOnly": True}
    assert mounts["state"]["mountPath"] == STATE
    (main,) = pod["containers"]
    assert volume not in {m["name"] for m in main["volumeMounts"]}
    assert {m["mountPath"] for m in main["volumeMounts"]} == {STATE, "/tmp"}
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["metrics"] == port
    for probe in ("startupProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    spec = _object("StatefulSet", statefulset)["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }


def test_the_hsas_start_together_behind_a_headless_service() -> None:
    spec = _object("StatefulSet", "hsa")["spec"]
    assert (spec["replicas"], spec["serviceName"]) == (3, "hsa")
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"] == HSA_LABELS
    headless = _object("Service", "hsa")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    assert headless["selector"] == HSA_LABELS
    assert {p["name"]: p["port"] for p in headless["ports"]} == {"grpc": 7700, "metrics": 9700}
    kms = _object("Service", "hsa-kms")["spec"]
    assert (kms["selector"], [p["port"] for p in kms["ports"]]) == (HSA_LABELS, [7700])
    coordinator = _object("StatefulSet", "coordinator")["spec"]
    assert coordinator["replicas"] == 1  # one writer of the SQLite store
    service = _object("Service", "coordinator")["spec"]
    assert service["selector"] == COORDINATOR_LABELS
    ports = {p["name"]: p["port"] for p in service["ports"]}
    assert ports == {"hsa": 7710, "operator": 7711, "metrics": 9710}


def _ingress_rules_to(port: int) -> list[Doc]:
    """Every ingress rule of every NetworkPolicy that opens `port`, with its policy's pods."""
    rules = []
    for policy in (o for o in _objects() if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if port in [p["port"] for p in rule.get("ports", [])]:
                rules.append({"pods": policy["spec"]["podSelector"], **rule})
    return rules


def test_network_policies_deny_by_default_and_open_7710_to_hsas_only() -> None:
    deny = _object("NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for policy in (o for o in _objects() if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports"), policy["metadata"]["name"]  # no rule opens every port
    (to_coordinator,) = _ingress_rules_to(7710)
    assert to_coordinator["pods"] == {"matchLabels": COORDINATOR_LABELS}
    assert to_coordinator["from"] == [{"podSelector": {"matchLabels": HSA_LABELS}}]
    (to_hsas,) = _ingress_rules_to(7700)
    assert to_hsas["pods"] == {"matchLabels": HSA_LABELS}
    sources = [peer.get("podSelector", {}).get("matchLabels") for peer in to_hsas["from"]]
    assert HSA_LABELS in sources
    assert COORDINATOR_LABELS in sources
    assert {"hsm-domain/kms-client": "true"} in sources
    for port in (9700, 9710):
        (metrics,) = _ingress_rules_to(port)
        (peer,) = metrics["from"]
        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    (operators,) = _ingress_rules_to(7711)
    assert operators["from"] == [{"podSelector": {}}]  # within the namespace only


def test_the_disruption_budget_covers_the_hsas() -> None:
    spec = _object("PodDisruptionBudget", "hsa")["spec"]
    assert spec == {"maxUnavailable": 1, "selector": {"matchLabels": HSA_LABELS}}


def test_the_secret_example_holds_no_data() -> None:
    secrets = {o["metadata"]["name"]: o for o in _objects() if o["kind"] == "Secret"}
    assert set(secrets) == {"hsa-bundles", "coordinator-bundle"}
    assert set(secrets["hsa-bundles"]["data"]) == {"hsa-0.tar", "hsa-1.tar", "hsa-2.tar"}
    assert set(secrets["coordinator-bundle"]["data"]) == {"coordinator.tar"}
    for secret in secrets.values():
        assert all(value == "" for value in secret["data"].values())  # the shape, no key


def _install_script(statefulset: str, state: Path, bundles: Path) -> list[str]:
    (init,) = _pod(statefulset)["initContainers"]
    assert init["command"][:2] == ["/bin/sh", "-c"]
    script = init["command"][2].replace(STATE, str(state)).replace("/bundles", str(bundles))
    return ["sh", "-c", script]


@pytest.mark.parametrize(("statefulset", "pod"), [("hsa", "hsa-1"), ("coordinator", "")])
def test_the_init_container_extracts_the_pods_own_bundle_once(
    statefulset: str, pod: str, tmp_path: Path
) -> None:
    state, bundles, source = tmp_path / "state", tmp_path / "bundles", tmp_path / "bundle"
    state.mkdir()
    bundles.mkdir()
    _fake_bundle(source)
    tar_name = f"{pod}.tar" if pod else "coordinator.tar"
    with tarfile.open(bundles / tar_name, "w") as tar:
        tar.add(source, arcname=".")
    argv = _install_script(statefulset, state, bundles)
    env = {**os.environ, "POD_NAME": pod or "coordinator-0"}
    result = _run(argv, env=env)
    assert result.returncode == 0, result.stderr
    assert (state / "config.json").read_text() == "{}"
    assert (state / "identity" / "tls.key").stat().st_mode & 0o077 == 0  # umask 077
    assert (state / "ca.crt").stat().st_mode & 0o077 == 0
    assert not (state / ".install").exists()
    (bundles / tar_name).unlink()  # the Secret deleted: the volume is enough
    again = _run(argv, env=env)
    assert again.returncode == 0
    assert "already installed" in again.stdout
    (state / "config.json").unlink()  # as if the first installation had been cut short
    lost = _run(argv, env=env)
    assert lost.returncode == 1
    assert "create the Secret" in lost.stderr
    with tarfile.open(bundles / tar_name, "w") as tar:
        tar.add(source, arcname=".")
    redone = _run(argv, env=env)
    assert redone.returncode == 0, redone.stderr
    assert (state / "config.json").read_text() == "{}"

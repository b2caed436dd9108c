"""The deployment files agree with the app: no Docker engine or cluster needed.

Parses the Dockerfile, compose file, Prometheus and Grafana configuration and the Kubernetes
manifests, and checks what they rely on (commands, ports, probe paths, setting names, metric
names) against the real application.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.routing import iter_route_contexts
from typer.main import get_command

from helpline.cli import app as cli_app
from helpline.core import metrics
from helpline.core.config import Settings
from helpline.main import create_app
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
HELPLINE_SERVICES = ("migrate", "app", "worker")
# Read from the environment by the server or the tracing SDK rather than by `Settings`.
EXTRA_ENV = {"FORWARDED_ALLOW_IPS", "PROMETHEUS_MULTIPROC_DIR"}
API_PORT = 8000


def settings_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields} | EXTRA_ENV


def default_settings() -> Settings:
    return Settings(_env_file=None, environment="test", auth_jwt_secret="x" * 40)  # type: ignore[call-arg]


def app_paths() -> set[str]:
    application = create_app(default_settings())
    return {context.path for context in iter_route_contexts(application.routes) if context.path}


def cli_commands() -> set[str]:
    group = get_command(cli_app)
    return set(group.commands)  # type: ignore[attr-defined]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc for doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    result: list[dict[str, Any]] = spec["containers"]
    return result


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def configmap() -> dict[str, str]:
    data: dict[str, str] = k8s_object("ConfigMap", "helpline-config")["data"]
    return data


# --- Dockerfile and .dockerignore ---------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_builds_in_stages_and_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    assert stages[0].endswith("AS builder")
    assert "slim" in stages[-1]
    second_stage = [kw for kw, _ in instructions].index("FROM", 1)
    runtime = instructions[second_stage:]
    assert [args for _, args in runtime if "from=builder" in args.lower()]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_serves_the_api_with_a_liveness_healthcheck() -> None:
    instructions = dict(dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["helpline"]
    command = json.loads(instructions["CMD"])
    assert command[0] == "serve"
    assert option(command, "--port") == str(API_PORT)
    assert option(command, "--host") == "0.0.0.0"
    healthcheck = instructions["HEALTHCHECK"]
    assert f"http://127.0.0.1:{API_PORT}/health/live" in healthcheck
    assert "/health/live" in app_paths()
    assert str(API_PORT) in instructions["EXPOSE"].split()


def test_dockerfile_commands_exist_in_the_cli() -> None:
    commands = cli_commands()
    assert {"serve", "migrate", "worker"} <= commands
    text = (DEPLOY / "Dockerfile").read_text()
    for used in re.findall(r"`(?:helpline )?(serve|worker|migrate|create-user|ingest)\b", text):
        assert used in commands


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        parts = Path(path).parts
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) or fnmatch.fnmatch(parts[i], pattern)
            for i in range(len(parts))
        )
        if hit:
            result = not negate
    return result


def test_dockerignore_keeps_secrets_out_and_the_sources_in() -> None:
    patterns = dockerignore_patterns()
    for secret in (".env", "deploy/.env", ".helpline/jwt_secret", "helpline.db", ".git/config"):
        assert ignored(secret, patterns), secret
    copied = []
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            copied.extend(args.split()[:-1])
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), source
    assert not ignored("src/helpline/main.py", patterns)


# --- docker compose -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return document


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict)
    return {str(key): str(value) for key, value in env.items()}


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"app", "worker", "migrate", "postgres", "redis", "prometheus", "grafana"} <= set(
        services
    )


def test_compose_runs_migrations_once_before_the_app_and_worker() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("app", "worker"):
        service = services[name]
        assert compose_env(service)["AUTO_MIGRATE"] == "false"
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_app_and_worker_commands_match_the_cli() -> None:
    services = compose()["services"]
    app_command = services["app"]["command"]
    assert app_command[0] == "serve"
    assert option(app_command, "--port") == str(API_PORT)
    assert option(app_command, "--host") == "0.0.0.0"
    assert "--workers" in app_command
    assert any(port.endswith(f":{API_PORT}") for port in services["app"]["ports"])
    assert services["worker"]["command"] == ["worker"]
    commands = cli_commands()
    for name in HELPLINE_SERVICES:
        assert services[name]["command"][0] in commands


def test_compose_uses_redis_and_postgres_for_the_helpline_services() -> None:
    services = compose()["services"]
    for name in HELPLINE_SERVICES:
        env = compose_env(services[name])
        assert env["DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert env["ENVIRONMENT"] == "production"
        assert env["AUTH_JWT_SECRET"].startswith("${AUTH_JWT_SECRET:?")


def test_compose_env_names_are_settings() -> None:
    known = settings_env_names()
    services = compose()["services"]
    for name in HELPLINE_SERVICES:
        unknown = set(compose_env(services[name])) - known
        assert not unknown, (name, unknown)


def test_compose_stop_grace_exceeds_the_shutdown_grace() -> None:
    services = compose()["services"]
    for name in ("app", "worker"):
        grace = float(compose_env(services[name])["SHUTDOWN_GRACE_S"])
        stop = services[name]["stop_grace_period"]
        assert stop.endswith("s")
        assert float(stop.removesuffix("s")) > grace


def test_compose_builds_from_the_dockerfile_and_mounts_existing_files() -> None:
    services = compose()["services"]
    build = services["app"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source


def test_compose_env_example_covers_the_required_variables() -> None:
    text = (DEPLOY / ".env.example").read_text()
    required = re.findall(r"\$\{([A-Z_]+):\?", (DEPLOY / "docker-compose.yml").read_text())
    assert required
    for name in required:
        assert re.search(rf"^{name}=", text, re.M), name


# --- Prometheus ---------------------------------------------------------------------------------


def scrape_jobs() -> dict[str, dict[str, Any]]:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


def dns_target(job: dict[str, Any]) -> tuple[str, int]:
    (discovery,) = job["dns_sd_configs"]
    (name,) = discovery["names"]
    return name, int(discovery["port"])


def test_prometheus_scrapes_the_api_metrics_path_and_port() -> None:
    job = scrape_jobs()["helpline-api"]
    service, port = dns_target(job)
    assert service == "app"
    assert service in compose()["services"]
    assert port == API_PORT
    assert job.get("metrics_path", "/metrics") == metrics.METRICS_PATH
    assert metrics.METRICS_PATH in app_paths()


def test_prometheus_scrapes_the_worker_metrics_port() -> None:
    job = scrape_jobs()["helpline-worker"]
    service, port = dns_target(job)
    assert service == "worker"
    worker = compose()["services"]["worker"]
    assert port == Settings.model_fields["worker_metrics_port"].default
    assert port == int(compose_env(worker)["WORKER_METRICS_PORT"])
    assert str(port) in [str(item) for item in worker["expose"]]


def test_the_worker_metrics_server_answers_the_scraped_path() -> None:
    path = scrape_jobs()["helpline-worker"].get("metrics_path", "/metrics")
    port = free_port()
    server, thread = metrics.start_worker_metrics_server(port, addr="127.0.0.1")
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert response.status_code == 200
    assert "# TYPE helpline_jobs_total counter" in response.text


# --- Grafana ------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "dashboards" / "helpline.json").read_text()
    )
    return document


def panels() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        result.append(panel)
        result.extend(panel.get("panels", []))
    return [panel for panel in result if panel.get("type") != "row"]


def dashboard_metric_names() -> set[str]:
    names = set()
    for panel in panels():
        for target in panel["targets"]:
            names.update(re.findall(r"\bhelpline_[a-z0-9_]+", target["expr"]))
    return names


def exposed_sample_names(exposition: str) -> set[str]:
    """Every sample name the exposition can carry, from its `# TYPE` declarations."""
    names = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(" ", 3)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update((name, f"{name}_sum", f"{name}_count"))
        else:
            names.add(name)
    return names


def test_grafana_datasource_points_at_the_compose_prometheus() -> None:
    config = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]
    variable = next(
        item for item in dashboard()["templating"]["list"] if item["name"] == "datasource"
    )
    assert variable["current"]["value"] == datasource["uid"]


def test_grafana_dashboard_provider_reads_the_mounted_folder() -> None:
    config = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "helpline.yml")
    (provider,) = config["providers"]
    mounts = {
        volume.split(":")[0]: volume.split(":")[1]
        for volume in compose()["services"]["grafana"]["volumes"]
    }
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_panels_are_complete() -> None:
    document = dashboard()
    assert document["uid"]
    assert document["title"]
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_dashboard_charts_what_operators_need() -> None:
    titles = " | ".join(panel["title"].lower() for panel in panels())
    for topic in ("request rate", "latency", "sockets", "tokens", "first token", "errors"):
        assert topic in titles, topic
    for topic in ("cancellations", "rate-limit", "jobs"):
        assert topic in titles, topic
    exprs = " ".join(t["expr"] for panel in panels() for t in panel["targets"])
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.95," in exprs


async def test_every_dashboard_metric_is_in_the_metrics_output(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    exposed = exposed_sample_names(response.text)
    queried = dashboard_metric_names()
    assert len(queried) >= 10
    assert not queried - exposed, sorted(queried - exposed)


# --- Kubernetes ---------------------------------------------------------------------------------


def test_k8s_manifests_have_every_object() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in k8s_documents()}
    assert {
        ("Deployment", "helpline-api"),
        ("Deployment", "helpline-worker"),
        ("Service", "helpline-api"),
        ("HorizontalPodAutoscaler", "helpline-api"),
        ("ConfigMap", "helpline-config"),
        ("Secret", "helpline-secrets"),
        ("Job", "helpline-migrate"),
    } <= kinds


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_api_probes_hit_the_health_routes_on_the_served_port() -> None:
    (container,) = containers(k8s_object("Deployment", "helpline-api"))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == API_PORT
    assert container["args"][0] == "serve"
    assert option(container["args"], "--port") == str(API_PORT)
    paths = app_paths()
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] in paths, probe
        assert ports.get(http_get["port"], http_get["port"]) == API_PORT, probe


def test_k8s_worker_probe_and_port_match_the_worker_metrics_server() -> None:
    workload = k8s_object("Deployment", "helpline-worker")
    (container,) = containers(workload)
    assert container["args"] == ["worker"]
    assert "worker" in cli_commands()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    expected = int(configmap()["WORKER_METRICS_PORT"])
    assert ports["metrics"] == expected == Settings.model_fields["worker_metrics_port"].default
    probe = container["livenessProbe"]["httpGet"]
    assert ports[probe["port"]] == expected
    assert probe["path"] == metrics.METRICS_PATH
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(expected)


def test_k8s_api_pods_are_scraped_on_the_metrics_path() -> None:
    annotations = k8s_object("Deployment", "helpline-api")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(API_PORT)
    assert annotations["prometheus.io/path"] in app_paths()


def test_k8s_termination_grace_exceeds_the_shutdown_grace() -> None:
    shutdown_grace = float(configmap()["SHUTDOWN_GRACE_S"])
    api = k8s_object("Deployment", "helpline-api")
    (container,) = containers(api)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
        pre_stop + shutdown_grace
    )
    worker = k8s_object("Deployment", "helpline-worker")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown_grace


def test_k8s_config_and_secret_names_are_settings() -> None:
    known = settings_env_names()
    assert not set(configmap()) - known, set(configmap()) - known
    secret = k8s_object("Secret", "helpline-secrets")["stringData"]
    assert not set(secret) - known
    assert {"AUTH_JWT_SECRET", "DATABASE_URL", "REDIS_URL", "LLM_API_KEY"} <= set(secret)
    assert configmap()["AUTO_MIGRATE"] == "false"
    assert configmap()["ENVIRONMENT"] == "production"


def test_k8s_workloads_read_the_configmap_and_the_secret() -> None:
    workloads = [
        k8s_object("Deployment", "helpline-api"),
        k8s_object("Deployment", "helpline-worker"),
        k8s_object("Job", "helpline-migrate"),
    ]
    images = set()
    for workload in workloads:
        for container in containers(workload):
            images.add(container["image"])
            refs = {
                (kind, source[kind]["name"]) for source in container["envFrom"] for kind in source
            }
            assert refs == {
                ("configMapRef", "helpline-config"),
                ("secretRef", "helpline-secrets"),
            }
            security = workload["spec"]["template"]["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True
    assert len(images) == 1


def test_k8s_migration_job_runs_the_migrate_command() -> None:
    job = k8s_object("Job", "helpline-migrate")
    (container,) = containers(job)
    assert container["args"] == ["migrate"]
    assert "migrate" in cli_commands()
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_k8s_service_and_autoscaler_target_the_api() -> None:
    api = k8s_object("Deployment", "helpline-api")
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    service = k8s_object("Service", "helpline-api")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = containers(api)
    port_names = {port["name"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names
    hpa = k8s_object("HorizontalPodAutoscaler", "helpline-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "helpline-api")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert api["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize(
    "path",
    sorted(str(path.relative_to(DEPLOY)) for path in DEPLOY.rglob("*.y*ml")),
)
def test_every_yaml_file_parses(path: str) -> None:
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / path).read_text()) if doc]
    assert documents
    assert all(isinstance(doc, dict) for doc in documents)


def test_readme_shell_examples_use_real_paths() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Operations") :]
    for command in re.findall(r"^\s*(?:docker compose|kubectl)[^\n]*$", section, re.M):
        for word in shlex.split(command, comments=True):
            if word.startswith(("deploy/", "./deploy/")):
                assert (ROOT / word.removeprefix("./")).exists(), word

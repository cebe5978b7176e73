"""The deployment files agree with each other and with the exported metrics' wiring.

``docker-compose config`` (the Debian package, installed by .ci/run) validates the compose file
without a Docker engine; the rest is parsed here. That the dashboard's queries return data from a
real Prometheus is shown by tests/integration/test_monitoring.py.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
DEPLOY = REPOSITORY / "deploy"
IMAGE = "rdml-dist:latest"


TOKENS = {"RAY_AUTH_TOKEN": "test-token", "RDML_RPC_TOKEN": "rpc-test-token"}


def compose_config(**environment: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("docker-compose"), "docker-compose is missing: .ci/run installs the Debian package"
    return subprocess.run(["docker-compose", "-f", str(REPOSITORY / "docker-compose.yml"), "config"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **environment}, cwd=REPOSITORY)


def compose() -> dict:
    """The compose file as docker-compose itself resolves it."""
    result = compose_config(**TOKENS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def command_line(service: dict) -> str:
    """A service's command as one string (compose keeps a string command as written, a list as a list)."""
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_compose_validates_and_every_service_runs_the_one_image() -> None:
    services = compose()["services"]
    assert set(services) == {"ray-head", "ray-worker", "trainer", "prometheus", "grafana"}
    for name in ("ray-head", "ray-worker", "trainer"):
        assert services[name]["image"] == IMAGE, name
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == "test-token"
    assert services["ray-head"]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert "ray job submit --address http://ray-head:8265" in command_line(services["trainer"])
    assert "ports" not in services["ray-worker"]  # workers scale with --scale: no fixed host port
    # The Ray job's driver runs on the head: the cohort service's own token is there, and only there.
    assert services["ray-head"]["environment"]["RDML_RPC_TOKEN"] == "rpc-test-token"
    assert "RDML_RPC_TOKEN" not in services["ray-worker"]["environment"]


@pytest.mark.parametrize("missing", sorted(TOKENS))
def test_compose_refuses_to_start_without_each_token(missing: str) -> None:
    result = compose_config(**{name: value for name, value in TOKENS.items() if name != missing})
    assert result.returncode != 0 and f"set {missing}" in result.stderr


def _kuberay_containers() -> list[dict]:
    containers = []
    for name in ("raycluster.yaml", "rayjob.yaml"):
        manifest = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
        cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            containers.extend(group["template"]["spec"]["containers"])
    return containers


def _entrypoints() -> list[str]:
    return [command_line(compose()["services"]["trainer"]),
            yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())["spec"]["entrypoint"]]


def test_no_deploy_file_hands_rays_token_to_the_cohort_service() -> None:
    assert compose()["services"]["ray-head"]["environment"]["RDML_RPC_TOKEN"] != TOKENS["RAY_AUTH_TOKEN"]
    secrets = 0
    for container in _kuberay_containers():
        sources = {entry["name"]: entry.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for entry in container["env"]}
        if "RDML_RPC_TOKEN" in sources:
            assert sources["RDML_RPC_TOKEN"] != sources["RAY_AUTH_TOKEN"], container["name"]
            secrets += 1
    assert secrets == 2  # the head of the RayCluster and of the RayJob, where drivers run


def test_no_deploy_file_serves_plaintext_beyond_loopback_or_replaces_a_run() -> None:
    for entrypoint in _entrypoints():
        assert "allow_plaintext" not in entrypoint, entrypoint
        rpc_host = re.search(r"rpc\.host=(\S+)", entrypoint)
        assert rpc_host is None or rpc_host.group(1).startswith("127.") or "rpc.tls_cert_file" in entrypoint, entrypoint
        assert "--overwrite" not in entrypoint, entrypoint  # a retried or re-applied job continues its run
        assert "--if-running wait" in entrypoint, entrypoint  # and waits for a driver that still writes it


def test_every_scrape_target_is_a_compose_service_and_port() -> None:
    services = compose()["services"]
    trainer = command_line(services["trainer"])
    metrics_port = re.search(r"monitoring\.port=(\d+)", trainer).group(1)
    ray_metrics_port = re.search(r"--metrics-export-port=(\d+)", command_line(services["ray-head"])).group(1)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [target for job in config["scrape_configs"] for static in job.get("static_configs", []) for target in static["targets"]]
    targets += [f"{name}:{dns['port']}" for job in config["scrape_configs"] for dns in job.get("dns_sd_configs", []) for name in dns["names"]]
    assert targets, "prometheus.yml scrapes nothing"
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, target
        assert port in {metrics_port, ray_metrics_port}, target
    assert f"ray-head:{metrics_port}" in targets and "runtime.coordinator.on_head_node=true" in trainer
    mounted = services["prometheus"]["volumes"][0]
    assert mounted.startswith(str(DEPLOY / "prometheus" / "prometheus.yml"))


def test_grafana_provisioning_points_at_the_compose_services() -> None:
    services = compose()["services"]
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in services and any(":9090" in str(port) for port in services["prometheus"]["ports"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "rdml.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in services["grafana"]["volumes"])
    assert Path(mounts[dashboards_path]) == DEPLOY / "grafana" / "dashboards"
    assert Path(mounts["/etc/grafana/provisioning"]) == DEPLOY / "grafana" / "provisioning"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "rdml-cohort.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_run_the_same_image_and_entrypoint(name: str, kind: str) -> None:
    manifest = yaml.safe_load((DEPLOY / "kuberay" / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    cluster = manifest["spec"] if kind == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == IMAGE
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    if kind == "RayJob":
        trainer = command_line(compose()["services"]["trainer"])
        compose_entrypoint = trainer[trainer.index("rdml-dist train"):].strip().rstrip('"').split()
        assert manifest["spec"]["entrypoint"].split() == compose_entrypoint


def test_the_dockerfile_builds_the_image_that_runs_rdml_dist() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^CMD \[\"rdml-dist\", \"train\"\]$", dockerfile, re.MULTILINE)
    assert "ARG TORCH_INDEX=" in dockerfile and "ARG BASE_IMAGE=" in dockerfile  # CPU or CUDA wheels
    assert "mkdir -p /data/rdml_results" in dockerfile  # the compose volume is writable by the image's user
    cluster = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == IMAGE and cluster["head_node_type"] in cluster["available_node_types"]

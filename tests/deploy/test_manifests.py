"""deploy/: every Kubernetes manifest validates against the official schemas (``kubernetes-validate``,
strict, two Kubernetes versions), and the files agree with each other and with the code they start:
Service and PDB selectors match the pod labels, probes use container ports, the HPA scales the
Deployment on the metric the adapter rule exposes, the gateway's arguments parse with the real
``vitserve serve`` parser, Triton's with the real ``tritonserver``, the grace period outlasts drain
+ grace, and the Dockerfile exposes and runs what the pod expects. With ``kubectl`` the kustomization
is rendered with every combination of its components and checked again; with ``promtool`` the
alerting rules run their unit tests and the adapter's queries parse."""

from __future__ import annotations

import copy
import itertools
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install -e '.[dev]'")
from kubernetes_validate import utils as kv  # noqa: E402

from serving.metrics import GatewayMetrics  # noqa: E402
from serving.server import _parser as serve_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# the oldest Kubernetes these files are written for (native gRPC probes are GA since 1.27) and the
# newest kubernetes-validate bundles
KUBERNETES_VERSIONS = ("1.30", kv.major_minor(kv.latest_version()))
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if p.is_dir())
KUSTOMIZE_GROUP = "kustomize.config.k8s.io"
# custom resources of prometheus-operator: no official schema; checked against our own files below
OPERATOR_GROUP = "monitoring.coreos.com"

# Gateway flags and metrics that the gateway half of issue 20 adds (built on another branch). The
# manifests use them already; until they exist in serving/ they are dropped before the arguments are
# parsed, and checked as soon as they exist. Remove this list once both halves are merged.

# --- loading ---------------------------------------------------------------------------------------

def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(path: Path = DEPLOY) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def _manifest_files() -> list[Path]:
    """Every YAML file under deploy/ that holds Kubernetes objects (not kustomize files, not patches,
    not Prometheus' own rule files)."""
    files = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "components" in path.relative_to(DEPLOY).parts:
            continue
        docs = _documents(path)
        if docs and all("apiVersion" in d and "kind" in d for d in docs):
            files.append(path)
    return files


def _base_objects() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/` creates, read from the files the kustomization lists."""
    return [d for name in _kustomization()["resources"] for d in _documents(DEPLOY / name)]


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r} in the pod"
    return found[0]


def _flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as {name: value} (a bare ``--name``: "")."""
    out = {}
    for arg in args:
        assert arg.startswith("--"), f"argument {arg!r}: the manifests write every flag as --name=value"
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def _probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def _probe_port(probe: dict[str, Any]) -> int | str:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            return probe[handler]["port"]
    raise AssertionError(f"probe without a port: {probe}")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schema validation -----------------------------------------------------------------------------

def _validate(obj: dict[str, Any], version: str) -> None:
    """Strict validation against the official schema of ``version``; a clear failure otherwise."""
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {version}: "
                             f"{path}: {e.message}") from None


def _validate_all(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["apiVersion"].split("/")[0] == OPERATOR_GROUP:
            continue  # custom resources: checked by test_operator_resources_match_our_files
        for version in KUBERNETES_VERSIONS:
            _validate(obj, version)


def _schema_files() -> list[Path]:
    """The manifest files with built-in kinds (the operator's custom resources have no official schema)."""
    return [p for p in _manifest_files()
            if any(d["apiVersion"].split("/")[0] != OPERATOR_GROUP for d in _documents(p))]


@pytest.mark.parametrize("path", _schema_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid_kubernetes_strict(path: Path) -> None:
    _validate_all(_documents(path))


def test_the_validator_rejects_a_misspelt_field() -> None:
    """Control: strict validation catches what `kubectl apply` would reject (an unknown field)."""
    deployment = copy.deepcopy(_one(_base_objects(), "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 75
    with pytest.raises(AssertionError, match="terminationGracePeriodSecond"):
        _validate(deployment, KUBERNETES_VERSIONS[0])
    deployment = copy.deepcopy(_one(_base_objects(), "Deployment"))
    _container(deployment["spec"]["template"]["spec"], "gateway")["readinessProbe"]["grpc"]["port"] = "health"
    with pytest.raises(AssertionError, match="port"):  # gRPC probes take a number, never a port name
        _validate(deployment, KUBERNETES_VERSIONS[0])


# --- cross-references ------------------------------------------------------------------------------

def check_cross_references(objects: list[dict[str, Any]]) -> None:
    """What the schemas cannot see: the objects of one rendering agree with each other."""
    deployment = _one(objects, "Deployment", "vitserve")
    template = deployment["spec"]["template"]
    labels, pod = template["metadata"]["labels"], template["spec"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)

    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}

    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert len(ports) == sum(len(c.get("ports", [])) for c in pod["containers"]), "port names repeat"
    for service in (o for o in objects if o["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert _selects(service["spec"]["selector"], labels), f"Service {name} selects no vitserve pod"
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"Service {name}: no container port {target}"
    headless = _one(objects, "Service", "vitserve-grpc-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["grpc"]

    for container in pod["containers"]:
        own = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for kind, probe in _probes(container):
            port = _probe_port(probe)
            assert port in own or port in own.values(), \
                f"{container['name']} {kind}: port {port} is not one of its container ports {own}"

    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert mounts <= set(volumes), f"mounts of undefined volumes: {mounts - set(volumes)}"
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims

    pdb = _one(objects, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)

    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vitserve_inflight_ratio"
    assert metric["pods"]["target"]["type"] == "AverageValue"

    check_gateway_and_triton(pod, template["metadata"].get("annotations", {}))


def check_gateway_and_triton(pod: dict[str, Any], annotations: dict[str, str]) -> None:
    """The two containers' arguments agree with their ports, probes, each other and the grace period."""
    gateway, triton = _container(pod, "gateway"), _container(pod, "triton")
    g, t = _flags(gateway["args"]), _flags(triton["args"])
    g_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    t_ports = {p["name"]: p["containerPort"] for p in triton["ports"]}

    for flag, port in (("--port", "grpc"), ("--http-port", "http"), ("--health-port", "health"),
                       ("--metrics-port", "metrics")):
        assert int(g[flag]) == g_ports[port], f"gateway {flag}={g[flag]} but container port {port}={g_ports[port]}"
    assert g["--host"] == "0.0.0.0", "the gateway must listen on the pod IP, not loopback"
    for kind in ("startupProbe", "readinessProbe"):
        assert gateway[kind]["grpc"]["port"] == int(g["--health-port"]), f"gateway {kind}: not the health port"
    assert annotations.get("prometheus.io/port", g["--metrics-port"]) == g["--metrics-port"]

    assert g["--triton-url"] in (f"localhost:{t['--grpc-port']}", f"127.0.0.1:{t['--grpc-port']}")
    assert t["--grpc-address"] == "127.0.0.1", "Triton's gRPC (no auth) stays inside the pod"
    assert int(t["--grpc-port"]) == t_ports["triton-grpc"]
    assert int(t["--http-port"]) == t_ports["triton-http"]
    assert int(t["--metrics-port"]) == t_ports["triton-metrics"]
    assert t["--strict-readiness"] == "true"
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": int(t["--http-port"])}

    # Shutdown order: the gateway drains and finishes its calls; Triton, held back by its preStop
    # wait, outlives it; Kubernetes SIGKILLs neither before both are done.
    drain, grace = float(g["--drain-seconds"]), float(g["--shutdown-grace"])
    pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    triton_wait, triton_exit = float(pre_stop[1]), float(t["--exit-timeout-secs"])
    period = pod["terminationGracePeriodSeconds"]
    assert triton_wait >= drain + grace, f"Triton gets SIGTERM at {triton_wait}s, the gateway may serve until {drain + grace}s"
    assert period > drain + grace, f"terminationGracePeriodSeconds {period} <= drain {drain} + grace {grace}"
    assert period > triton_wait + triton_exit, f"terminationGracePeriodSeconds {period} <= {triton_wait} + {triton_exit}"
    assert float(g["--triton-timeout"]) >= triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"]


def test_the_base_objects_agree_with_each_other() -> None:
    check_cross_references(_base_objects())


def test_the_cross_reference_check_catches_a_wrong_selector() -> None:
    """Control: the checks above fail on a Service that selects no pod and a grace period too short."""
    objects = copy.deepcopy(_base_objects())
    _one(objects, "Service", "vitserve-grpc-headless")["spec"]["selector"]["app.kubernetes.io/name"] = "other"
    with pytest.raises(AssertionError, match="selects no vitserve pod"):
        check_cross_references(objects)
    objects = copy.deepcopy(_base_objects())
    _one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 40
    with pytest.raises(AssertionError, match="terminationGracePeriodSeconds"):
        check_cross_references(objects)


def _gateway_args(objects: list[dict[str, Any]]) -> list[str]:
    return _container(_one(objects, "Deployment")["spec"]["template"]["spec"], "gateway")["args"]


def test_the_gateway_args_parse_with_vitserve_serve() -> None:
    parser = serve_parser()
    known = set(parser._option_string_actions)
    args = _gateway_args(_base_objects())
    unknown = {a.partition("=")[0] for a in args} - known
    assert not unknown, f"flags vitserve serve does not have: {sorted(unknown)}"
    try:
        parsed = parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"vitserve serve {shlex.join(args)} exits {e.code} (see stderr)") from None
    assert parsed.triton_url == "localhost:8001" and parsed.model_repository is None


def test_the_metrics_the_autoscaler_reads_are_the_gateways() -> None:
    exported = {m.name for m in GatewayMetrics().registry.collect()}
    adapter = yaml.safe_load(_one(_documents(DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml"),
                                  "ConfigMap")["data"]["config.yaml"])
    exposed, series = set(), set()
    for rule in adapter["rules"]:
        series.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'")).group(0))
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        exposed.add(rule["name"]["as"])
    hpa = _one(_base_objects(), "HorizontalPodAutoscaler")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= exposed
    # prometheus_client names a family without the _bucket / _total of its series
    families = {re.sub(r"_bucket$", "", s) for s in series}
    missing = families - exported
    assert not missing, f"the adapter reads series the gateway does not export: {missing}"

    alerts = (DEPLOY / "monitoring" / "alerts.rules.yaml").read_text()
    families = {re.sub(r"_(bucket|total)$", "", s) for s in re.findall(r"\bvitserve_[a-z_]+", alerts)}
    missing = families - exported
    assert not missing, f"the alerts read series the gateway does not export: {missing}"


def test_the_dockerfile_matches_the_gateway_container() -> None:
    dockerfile = dockerfile_instructions()
    gateway = _container(_one(_base_objects(), "Deployment")["spec"]["template"]["spec"], "gateway")
    exposed = {int(p) for line in dockerfile["EXPOSE"] for p in line.split()}
    assert exposed == {p["containerPort"] for p in gateway["ports"]}
    [user] = dockerfile["USER"]
    assert int(user) == gateway["securityContext"]["runAsUser"]
    assert gateway["securityContext"]["runAsNonRoot"] is True
    assert dockerfile["ENTRYPOINT"] == ['["vitserve", "serve"]'], "the container's args are vitserve serve's flags"
    assert "command" not in gateway

    packages = {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {Path(src).name for src in dockerfile_copy_sources(dockerfile)}
    assert packages | {"pyproject.toml", "README.md"} <= copied, f"not copied: {packages - copied}"

    image = gateway["image"].partition(":")[0]
    assert image in {i["name"] for i in _kustomization()["images"]}
    triton = _container(_one(_base_objects(), "Deployment")["spec"]["template"]["spec"], "triton")
    assert triton["image"].partition(":")[0] in {i["name"] for i in _kustomization()["images"]}


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> dict[str, list[str]]:
    """deploy/Dockerfile as {INSTRUCTION: [arguments, ...]} (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.setdefault(instruction.upper(), []).append(rest.strip())
    return out


def dockerfile_copy_sources(instructions: dict[str, list[str]]) -> list[str]:
    """The repository paths the Dockerfile's COPY lines take (every word but the destination)."""
    return [src for line in instructions["COPY"] for src in shlex.split(line)[:-1]]


# --- kustomize ------------------------------------------------------------------------------------

def test_the_kustomization_lists_every_base_manifest() -> None:
    kustomization = _kustomization()
    listed = {DEPLOY / r for r in kustomization["resources"]}
    assert all(p.is_file() for p in listed), [str(p) for p in listed if not p.is_file()]
    top_level = {p for p in _manifest_files() if p.parent == DEPLOY}
    assert top_level == listed, f"manifests in deploy/ that the kustomization leaves out: {top_level - listed}"
    for component in COMPONENTS:
        k = _kustomization(DEPLOY / "components" / component)
        assert k["kind"] == "Component"
        assert all((DEPLOY / "components" / component / p["path"]).is_file() for p in k["patches"])
        assert f"components/{component}" in (DEPLOY / "kustomization.yaml").read_text()


def _render(tmp_path: Path, components: tuple[str, ...]) -> list[dict[str, Any]]:
    """`kubectl kustomize` of deploy/ with ``components`` applied."""
    overlay = tmp_path / ("overlay-" + "-".join(components or ("base",)))
    overlay.mkdir()
    base = os.path.relpath(DEPLOY, overlay)  # kustomize takes relative paths only
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": f"{KUSTOMIZE_GROUP}/v1beta1", "kind": "Kustomization", "resources": [base],
        "components": [f"{base}/components/{c}" for c in components]}))
    done = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize with {components or 'no components'}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _component_sets() -> list[tuple[str, ...]]:
    return [c for n in range(len(COMPONENTS) + 1) for c in itertools.combinations(COMPONENTS, n)]


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl (with its built-in kustomize) is not installed: the rendered "
                           "kustomization with its components is not checked; the raw files are")
@pytest.mark.parametrize("components", _component_sets(), ids=lambda c: "+".join(c) or "base")
def test_kustomize_renders_valid_objects(tmp_path: Path, components: tuple[str, ...]) -> None:
    objects = _render(tmp_path, components)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    _validate_all(objects)
    check_cross_references(objects)
    deployment = _one(objects, "Deployment")
    triton = _container(deployment["spec"]["template"]["spec"], "triton")
    assert (triton["resources"]["limits"].get("nvidia.com/gpu") == 1) == ("gpu" in components)
    repository = _flags(triton["args"])["--model-repository"]
    if "object-store" in components:
        assert repository.startswith("s3://") and "model-repository" not in {
            v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    else:
        assert repository == "/models"


# --- Triton's own flags ----------------------------------------------------------------------------

def _triton_help() -> str:
    try:
        from serving.triton_tree import pytriton_paths, server_env
        server_dir, libs_dir, _ = pytriton_paths()
    except Exception as e:  # noqa: BLE001 - any reason the binary is not there
        pytest.skip(f"no tritonserver binary to check Triton's flags against: {e}")
    done = subprocess.run([str(server_dir / "bin" / "tritonserver"), "--help"], capture_output=True,
                          text=True, timeout=60, env=server_env(libs_dir))
    return done.stdout + done.stderr


def test_triton_args_are_flags_of_tritonserver() -> None:
    """Every Triton argument (base and object-store component) is a flag of the tritonserver that
    `vitserve serve` embeds (2.51, the release in the NGC 24.10 image the Deployment runs)."""
    known = set(re.findall(r"^\s+(--[a-z0-9-]+)", _triton_help(), re.M))
    assert {"--model-repository", "--grpc-port"} <= known, "tritonserver --help did not list its flags"
    triton = _container(_one(_base_objects(), "Deployment")["spec"]["template"]["spec"], "triton")
    patch = _documents(DEPLOY / "components" / "object-store" / "triton-s3.yaml")[0]
    s3 = _container(patch["spec"]["template"]["spec"], "triton")
    for args in (triton["args"], s3["args"]):
        unknown = set(_flags(args)) - known
        assert not unknown, f"not flags of tritonserver: {sorted(unknown)}"
    # the component replaces the whole list: it must differ from the base in the repository alone
    assert {k: v for k, v in _flags(s3["args"]).items() if k != "--model-repository"} == \
        {k: v for k, v in _flags(triton["args"]).items() if k != "--model-repository"}


# --- monitoring ------------------------------------------------------------------------------------

def test_operator_resources_match_our_files() -> None:
    monitoring = DEPLOY / "monitoring"
    rule = _one(_documents(monitoring / "prometheusrule.yaml"), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((monitoring / "alerts.rules.yaml").read_text()), \
        "prometheusrule.yaml and alerts.rules.yaml hold different groups"
    monitor = _one(_documents(monitoring / "servicemonitor.yaml"), "ServiceMonitor")
    service = _one(_base_objects(), "Service", "vitserve-http")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus): the alert "
                             "rules' unit tests and the adapter's queries are not checked")


def _promtool(*args: str, cwd: Path) -> None:
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


@needs_promtool
def test_alert_rules_pass_their_unit_tests() -> None:
    _promtool("check", "rules", "alerts.rules.yaml", cwd=DEPLOY / "monitoring")
    _promtool("test", "rules", "alerts.test.yaml", cwd=DEPLOY / "monitoring")


@needs_promtool
def test_the_adapter_queries_are_promql(tmp_path: Path) -> None:
    """The adapter's templates, filled the way it fills them for an HPA's request, parse as PromQL."""
    adapter = yaml.safe_load(_one(_documents(DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml"),
                                  "ConfigMap")["data"]["config.yaml"])
    rules = []
    for i, rule in enumerate(adapter["rules"]):
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'")).group(0)
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"vitserve-a|vitserve-b"')
                 .replace("<<.GroupBy>>", "pod"))
        rules.append({"record": f"adapter:query_{i}", "expr": query})
    (tmp_path / "adapter.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    _promtool("check", "rules", "adapter.rules.yaml", cwd=tmp_path)


# --- docs ------------------------------------------------------------------------------------------

def test_the_docs_give_the_client_target_of_the_headless_service() -> None:
    headless = _one(_base_objects(), "Service", "vitserve-grpc-headless")
    [port] = headless["spec"]["ports"]
    target = f"dns:///{headless['metadata']['name']}.<namespace>.svc.cluster.local:{port['port']}"
    assert target in (ROOT / "docs" / "DEPLOY.md").read_text()
    assert target in (DEPLOY / "services.yaml").read_text()

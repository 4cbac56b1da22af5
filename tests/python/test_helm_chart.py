"""Checks of the Helm chart in helm/moge-serve on its rendered output.

Helm comes from scripts/helm.sh (the npm package that ships it). Every
manifest is validated in strict mode against the Kubernetes 1.31 schemas of
the kubernetes-validate package. The invariant tests read the rendered
manifests and the services' TOML files as a cluster would. The flag tests
compare every rendered setting with the `--help` output of the release
binaries. Those come from target/release, or from MOGE_MOGE_GATEWAY,
MOGE_MOGE_ROUTER and MOGE_MOGE_EXPERT, as in test_kserve_front.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "moge-serve"
KUBERNETES_VERSION = "1.31"
RELEASE = "pangu"
NAMESPACE = "llm"
FULLNAME = "pangu-moge-serve"
HELM_TIMEOUT_SECONDS = 120
BINARY_TIMEOUT_SECONDS = 30

# Values files rendered by every invariant test. None renders the defaults.
VALUES_FILES = {
    "default": None,
    "groups-8x2": CHART / "ci" / "groups-8x2-values.yaml",
    "groups-4-tls-monitoring": CHART / "ci" / "groups-4-tls-monitoring-values.yaml",
    "minimal": CHART / "ci" / "minimal-values.yaml",
}
# Kinds that the Prometheus Operator defines, so kubernetes-validate has no
# schema for them.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
BINARY_OF_COMPONENT = {
    "gateway": "moge-gateway",
    "router": "moge-router",
    "expert-group": "moge-expert",
    "shared-expert": "moge-expert",
}
HEALTH_SERVICE_OF_COMPONENT = {
    "gateway": "inference.GRPCInferenceService",
    "router": "moge.v1.Router",
    "expert-group": "moge.v1.ExpertGroup",
    "shared-expert": "moge.v1.ExpertGroup",
}
# Environment variables the chart sets that are not MOGE_ settings.
NON_FLAG_VARIABLES = {"RUST_LOG", "RUST_BACKTRACE"}


# ---------------------------------------------------------------- helpers


@functools.cache
def helm_binary() -> str:
    """Install Helm through scripts/helm.sh and return its path."""
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "helm.sh")],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"scripts/helm.sh failed:\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm_binary(), *args],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_SECONDS,
    )


def template_args(values_file: Path | None) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", f"{KUBERNETES_VERSION}.0"]
    if values_file is not None:
        args += ["--values", str(values_file)]
    return args


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    """Render the chart with one of VALUES_FILES and return its manifests."""
    result = run_helm(*template_args(VALUES_FILES[name]))
    assert result.returncode == 0, f"helm template with {name} values failed:\n{result.stderr}"
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def merge_values(base: dict, override: dict) -> dict:
    """Merge values as Helm does: maps merge key by key, anything else replaces, null deletes."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.cache
def chart_values(name: str) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if VALUES_FILES[name] is not None:
        values = merge_values(values, yaml.safe_load(VALUES_FILES[name].read_text()))
    return values


def expected_experts(name: str) -> list[dict]:
    """Expert workloads the values ask for: name, group (None for the shared expert) and replicas."""
    values = chart_values(name)
    defaults = values["expertDefaults"]
    experts = [
        {"name": f"{FULLNAME}-group-{index}", "group": index, "replicas": {**defaults, **entry}["replicas"]}
        for index, entry in enumerate(values["expertGroups"])
    ]
    shared = {**defaults, **values["sharedExpert"]}
    experts.append({"name": f"{FULLNAME}-shared-expert", "group": None, "replicas": shared["replicas"]})
    return experts


def find(documents, kind: str, name: str) -> dict:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workloads(documents):
    return [d for d in documents if d["kind"] in WORKLOAD_KINDS]


def component(document: dict) -> str:
    return document["metadata"]["labels"]["app.kubernetes.io/component"]


def service_config(documents, workload: dict) -> dict:
    """Parse the TOML file that a workload's container reads through --config."""
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    config_map = next(v["configMap"]["name"] for v in volumes if v["name"] == "config")
    return tomllib.loads(find(documents, "ConfigMap", config_map)["data"]["moge.toml"])


def dns_name(service: str, pod: str | None = None) -> str:
    host = f"{service}.{NAMESPACE}.svc.cluster.local"
    return f"{pod}.{host}" if pod else host


def binary_path(name: str) -> Path:
    return Path(os.environ.get(f"MOGE_{name.upper().replace('-', '_')}", REPO_ROOT / "target" / "release" / name))


@functools.cache
def binary_help(name: str) -> str:
    binary = binary_path(name)
    if not binary.is_file():
        pytest.skip(f"{binary} not found; scripts/test.sh builds it with `cargo build --release` before pytest")
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=BINARY_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"{binary} --help failed:\n{result.stderr}"
    return result.stdout


# Maps documented as one value: Kubernetes resources, probe timings and labels.
OPAQUE_VALUES = {"resources", "probes", "labels"}


def value_paths(values: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the values that the chart README must document: every
    leaf, and every map under a key in OPAQUE_VALUES as a whole."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in OPAQUE_VALUES:
            paths.extend(value_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


values_names = pytest.mark.parametrize("name", list(VALUES_FILES))


# ---------------------------------------------------------------- lint and schemas


@values_names
def test_chart_lints_strictly(name):
    args = ["lint", "--strict", str(CHART), "--kube-version", f"{KUBERNETES_VERSION}.0"]
    if VALUES_FILES[name] is not None:
        args += ["--values", str(VALUES_FILES[name])]
    result = run_helm(*args)
    assert result.returncode == 0, f"helm lint --strict with {name} values failed:\n{result.stdout}{result.stderr}"
    # helm lint reports a template's `fail` only as [INFO], so a failed render
    # must be caught here.
    assert "Fail:" not in result.stdout + result.stderr, result.stdout + result.stderr


@values_names
def test_manifests_match_kubernetes_schemas(name):
    errors = []
    for document in rendered(name):
        if document["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            message = getattr(error, "message", str(error))
            path = "/".join(str(part) for part in getattr(getattr(error, "caught", None), "path", []))
            errors.append(f"{document['kind']} {document['metadata']['name']}: {path}: {message}")
    assert not errors, "manifests that Kubernetes 1.31 rejects:\n" + "\n".join(errors)


def test_operator_resources_rendered_when_enabled():
    documents = rendered("groups-4-tls-monitoring")

    monitor = find(documents, "ServiceMonitor", FULLNAME)
    rule = find(documents, "PrometheusRule", FULLNAME)
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in documents if d["kind"] == "Service"]
    selected = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert selected == services, "the ServiceMonitor must select every Service of the release"
    assert all("metrics" in [port["name"] for port in s["spec"]["ports"]] for s in selected)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == (alerts.get("groups") or [])


def test_operator_resources_absent_by_default():
    kinds = {document["kind"] for document in rendered("default")}

    assert not kinds & OPERATOR_KINDS


# ---------------------------------------------------------------- invariants


@values_names
def test_every_group_has_workload_and_service(name):
    documents = rendered(name)

    for expert in expected_experts(name):
        workload = find(documents, "StatefulSet", expert["name"])
        service = find(documents, "Service", expert["name"])
        assert workload["spec"]["replicas"] == expert["replicas"], expert["name"]
        assert workload["spec"]["serviceName"] == service["metadata"]["name"]
        assert service["spec"]["clusterIP"] == "None", f"{expert['name']}: the Service must be headless"
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        other_pods = [
            w for w in workloads(documents) if w is not workload and service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert not other_pods, f"the Service {expert['name']} also selects pods of {other_pods[0]['metadata']['name']}"
    expert_sets = [w for w in workloads(documents) if w["kind"] == "StatefulSet"]
    assert len(expert_sets) == len(expected_experts(name))


@values_names
def test_expert_config_names_only_own_group(name):
    documents = rendered(name)
    values = chart_values(name)

    for expert in expected_experts(name):
        config = service_config(documents, find(documents, "StatefulSet", expert["name"]))
        if expert["group"] is None:
            assert config.get("shared_expert") is True
            assert "group" not in config
        else:
            assert config["group"] == expert["group"]
            assert "shared_expert" not in config
        assert config["checkpoint"] == values["checkpoint"]["mountPath"]
        assert config.get("layers", []) == values["checkpoint"]["layers"]


@values_names
def test_gateway_upstreams_cover_every_group(name):
    documents = rendered(name)
    values = chart_values(name)
    scheme = "https" if values["tls"]["secretName"] else "http"
    port = values["ports"]["grpc"]

    gateway = find(documents, "Deployment", f"{FULLNAME}-gateway")
    config = service_config(documents, gateway)
    experts = expected_experts(name)
    groups = [expert for expert in experts if expert["group"] is not None]
    shared = experts[-1]

    def pod_urls(expert):
        service = find(documents, "Service", expert["name"])["metadata"]["name"]
        pods = [f"{expert['name']}-{replica}" for replica in range(expert["replicas"])]
        return [f"{scheme}://{dns_name(service, pod)}:{port}" for pod in pods]

    assert len(config["group"]) == len(groups), "one --group per expert group"
    for expert, urls in zip(groups, config["group"], strict=True):
        assert urls.split(",") == pod_urls(expert), f"group {expert['group']}"
    assert config["shared_expert"] == pod_urls(shared)
    router_service = find(documents, "Service", f"{FULLNAME}-router")
    assert config["router"] == [f"{scheme}://{dns_name(router_service['metadata']['name'])}:{port}"]
    assert port in [p["port"] for p in router_service["spec"]["ports"]]


@values_names
def test_ports_agree_with_service_config(name):
    documents = rendered(name)
    values = chart_values(name)
    ports = values["ports"]

    for workload in workloads(documents):
        label = workload["metadata"]["name"]
        config = service_config(documents, workload)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        expected = {"grpc": ports["grpc"]}
        if component(workload) == "gateway":
            expected["http"] = ports["http"]
            assert config["http_port"] == ports["http"], label
        if values["metrics"]["enabled"]:
            expected["metrics"] = ports["metrics"]
            assert config["metrics_port"] == ports["metrics"], label
        else:
            assert config["disable_metrics"] is True, label
        assert container_ports == expected, label
        assert config["grpc_port"] == ports["grpc"], label
        assert config["host"] == "0.0.0.0", f"{label}: the service must listen on every address of the pod"

        services = [
            s for s in documents if s["kind"] == "Service" and s["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(services) == 1, label
        for port in services[0]["spec"]["ports"]:
            assert port["targetPort"] == port["name"], label
            assert port["name"] in container_ports, label
            assert port["port"] == container_ports[port["name"]], label


@values_names
def test_containers_have_resources_probes_and_hardening(name):
    documents = rendered(name)
    values = chart_values(name)

    for workload in workloads(documents):
        label = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, label
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, label
        service_account = find(documents, "ServiceAccount", pod["serviceAccountName"]) if values["serviceAccount"]["create"] else None
        if service_account is not None:
            assert service_account["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{label}/{container['name']}"
            assert container["resources"]["requests"]["cpu"], where
            assert container["resources"]["requests"]["memory"], where
            assert container["resources"]["limits"]["memory"], where
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in container, f"{where}: no {probe}"


@values_names
def test_probes_check_grpc_health_of_component(name):
    documents = rendered(name)
    values = chart_values(name)

    for workload in workloads(documents):
        label = workload["metadata"]["name"]
        container = workload["spec"]["template"]["spec"]["containers"][0]
        tls = values["gateway"]["tls"]["secretName"] if component(workload) == "gateway" else values["tls"]["secretName"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            handler = container[probe]
            if tls:
                # The kubelet's gRPC probe cannot do TLS.
                assert handler["tcpSocket"] == {"port": "grpc"}, f"{label} {probe}"
                continue
            assert handler["grpc"]["port"] == values["ports"]["grpc"], f"{label} {probe}"
            expected = "" if probe == "livenessProbe" else HEALTH_SERVICE_OF_COMPONENT[component(workload)]
            assert handler["grpc"].get("service", "") == expected, f"{label} {probe}"


def test_expert_startup_probe_allows_checkpoint_loading():
    container = find(rendered("default"), "StatefulSet", f"{FULLNAME}-group-0")["spec"]["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]

    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@values_names
def test_termination_grace_covers_drain(name):
    documents = rendered(name)
    service = chart_values(name)["service"]

    for workload in workloads(documents):
        pod = workload["spec"]["template"]["spec"]
        config = service_config(documents, workload)
        assert config["drain_timeout_seconds"] == service["drainTimeoutSeconds"]
        # The gateway drains gRPC, then waits up to another drain timeout for HTTP.
        drains = 2 if component(workload) == "gateway" else 1
        pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pre_stop == service["preStopSleepSeconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drains * service["drainTimeoutSeconds"], workload["metadata"]["name"]


@values_names
def test_checkpoint_mounted_read_only(name):
    documents = rendered(name)
    values = chart_values(name)
    source = values["checkpoint"]["source"]

    for workload in workloads(documents):
        pod = workload["spec"]["template"]["spec"]
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        if component(workload) == "gateway":
            assert "checkpoint" not in mounts
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == "checkpoint")
        assert source in volume, f"{workload['metadata']['name']}: expected a {source} volume"
        assert mounts["checkpoint"]["readOnly"] is True
        assert mounts["checkpoint"]["mountPath"] == values["checkpoint"]["mountPath"]
        if source == "persistentVolumeClaim":
            assert volume["persistentVolumeClaim"]["readOnly"] is True


@values_names
def test_only_gateway_reaches_router_and_experts(name):
    documents = rendered(name)
    if not chart_values(name)["networkPolicy"]["enabled"]:
        assert not [d for d in documents if d["kind"] == "NetworkPolicy"]
        return
    gateway_labels = find(documents, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"]["labels"]

    policy = find(documents, "NetworkPolicy", f"{FULLNAME}-internal")
    grpc_rules = [rule for rule in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]

    assert len(grpc_rules) == 1
    peers = grpc_rules[0]["from"]
    assert len(peers) == 1
    assert set(peers[0]) == {"podSelector"}
    assert peers[0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    for workload in workloads(documents):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selected = policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items() and labels["app.kubernetes.io/component"] in policy["spec"]["podSelector"]["matchExpressions"][0]["values"]
        assert selected == (component(workload) != "gateway"), workload["metadata"]["name"]
    for rule in policy["spec"]["ingress"]:
        assert rule is grpc_rules[0] or rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_tls_secrets_mounted_and_configured():
    documents = rendered("groups-4-tls-monitoring")
    values = chart_values("groups-4-tls-monitoring")

    for workload in workloads(documents):
        label = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        config = service_config(documents, workload)
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert secrets["tls"] == values["tls"]["secretName"], label
        for volume in secrets:
            assert mounts[volume]["readOnly"] is True, f"{label}: {volume}"
        if component(workload) == "gateway":
            assert config["upstream_tls_ca_file"] == f"{mounts['tls']['mountPath']}/ca.crt"
            assert config["upstream_tls_cert_file"] == f"{mounts['tls']['mountPath']}/tls.crt"
            assert config["tls_cert_file"] == f"{mounts['gateway-tls']['mountPath']}/tls.crt"
            assert config["auth_token_file"].startswith(mounts["auth-token"]["mountPath"] + "/")
        else:
            assert config["tls_cert_file"] == f"{mounts['tls']['mountPath']}/tls.crt"
            assert config["tls_client_ca_file"] == f"{mounts['tls']['mountPath']}/ca.crt"


def test_device_requests_reach_expert_pods():
    documents = rendered("groups-4-tls-monitoring")

    group = find(documents, "StatefulSet", f"{FULLNAME}-group-1")["spec"]["template"]["spec"]
    shared = find(documents, "StatefulSet", f"{FULLNAME}-shared-expert")["spec"]["template"]["spec"]

    resources = group["containers"][0]["resources"]
    assert resources["requests"]["huawei.com/Ascend910"] == 1
    assert resources["limits"]["huawei.com/Ascend910"] == 1
    assert group["nodeSelector"] == {"accelerator": "ascend-910b"}
    assert "huawei.com/Ascend910" not in shared["containers"][0]["resources"]["limits"]
    assert shared["nodeSelector"] == {"accelerator": "ascend-910"}


@values_names
def test_autoscaled_deployments_leave_replicas_to_autoscaler(name):
    documents = rendered(name)
    values = chart_values(name)

    for part in ("gateway", "router"):
        deployment = find(documents, "Deployment", f"{FULLNAME}-{part}")
        autoscalers = [d for d in documents if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == f"{FULLNAME}-{part}"]
        budgets = [d for d in documents if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == f"{FULLNAME}-{part}"]
        if values[part]["autoscaling"]["enabled"]:
            assert "replicas" not in deployment["spec"], part
            assert autoscalers[0]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        else:
            assert deployment["spec"]["replicas"] == values[part]["replicas"]
            assert not autoscalers
        assert bool(budgets) == values[part]["podDisruptionBudget"]["enabled"], part


def test_dashboard_configmap_has_sidecar_label():
    documents = rendered("default")

    dashboard = find(documents, "ConfigMap", f"{FULLNAME}-dashboard")

    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["moge-serve.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())


@pytest.mark.parametrize("name", ["default", "groups-4-tls-monitoring"])
def test_notes_explain_first_request(name, tmp_path):
    # `helm template` skips NOTES.txt, so a copy of the chart renders it
    # through a ConfigMap.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "files" / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
    )
    args = template_args(VALUES_FILES[name])
    args[2] = str(chart)

    result = run_helm(*args, "--show-only", "templates/notes-check.yaml")

    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    gateway = f"{FULLNAME}-gateway"
    assert f"port-forward service/{gateway}" in notes
    assert "/v2/models/moge/infer" in notes
    assert "hidden_states" in notes
    if chart_values(name)["gateway"]["authToken"]["secretName"]:
        assert notes.index("TOKEN=$(") < notes.index("/v2/health/ready"), "the token must be read before its first use"


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    missing = [path for path in value_paths(values) if f"`{path}`" not in readme]

    assert not missing, f"values not documented in {CHART / 'README.md'}: {missing}"


# ---------------------------------------------------------------- flags of the binaries


@values_names
def test_rendered_settings_exist_in_binaries(name):
    documents = rendered(name)
    missing = []

    for workload in workloads(documents):
        binary = BINARY_OF_COMPONENT[component(workload)]
        help_text = binary_help(binary)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == [f"/usr/local/bin/{binary}"]
        flags = [arg for arg in container["args"] if arg.startswith("--")]
        flags += ["--" + key.replace("_", "-") for key in service_config(documents, workload)]
        for flag in flags:
            # The flag's name ends at a space, `=` or the end of the line,
            # so that --metrics does not match --metrics-port.
            if not re.search(rf"^\s+(-\w, )?{re.escape(flag)}(?=[ =]|$)", help_text, re.MULTILINE):
                missing.append(f"{binary} {flag}")
        for variable in container.get("env", []):
            if variable["name"] in NON_FLAG_VARIABLES:
                continue
            if f"[env: {variable['name']}=" not in help_text:
                missing.append(f"{binary} ${variable['name']}")

    assert not missing, "settings the chart renders but the binaries lack:\n" + "\n".join(sorted(set(missing)))


@values_names
def test_binaries_accept_rendered_config(name, tmp_path):
    """Start each binary on its rendered TOML file: it must get past parsing.

    The checkpoint path does not exist here, every upstream address is
    rewritten to a closed loopback port, and the TLS and token files are
    empty. So a binary that accepts its settings stops with exit code 1
    (checkpoint, router or certificate unusable), while a rejected setting
    exits with code 2.
    """
    documents = rendered(name)
    secrets = tmp_path / "secrets"

    for workload in workloads(documents):
        binary_name = BINARY_OF_COMPONENT[component(workload)]
        binary_help(binary_name)
        binary = binary_path(binary_name)
        text = find(documents, "ConfigMap", next(v["configMap"]["name"] for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"))["data"]["moge.toml"]
        text = re.sub(r"https?://[^\",]+", "http://127.0.0.1:9", text)
        text = text.replace(json.dumps(chart_values(name)["checkpoint"]["mountPath"]), json.dumps(str(tmp_path / "missing-checkpoint")))
        for path in re.findall(r'"(/etc/moge/[^"]+)"', text):
            local = secrets / path.removeprefix("/etc/moge/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
            text = text.replace(f'"{path}"', json.dumps(str(local)))
        config_file = tmp_path / f"{workload['metadata']['name']}.toml"
        config_file.write_text(text)
        environment = {**os.environ, "MOGE_STARTUP_TIMEOUT_SECONDS": "0", "MOGE_HOST": "127.0.0.1", "RUST_BACKTRACE": "0", "MOGE_REPLICA": "test-0"}

        result = subprocess.run(
            [str(binary), "--config", str(config_file)],
            capture_output=True,
            text=True,
            env=environment,
            timeout=BINARY_TIMEOUT_SECONDS,
        )

        assert result.returncode == 1, f"{binary.name} with {config_file.name} exited {result.returncode}:\n{result.stderr[-2000:]}"


# ---------------------------------------------------------------- bad values

BAD_VALUES = {
    "negative-replicas": ("expertGroups:\n  - replicas: -1\n", "expertGroups.0.replicas"),
    "zero-replicas": ("expertDefaults:\n  replicas: 0\n", "expertDefaults.replicas"),
    "zero-groups": ("expertGroups: []\n", "expertGroups: Array must have at least 1 items"),
    "misspelled-key": ("expertGroup:\n  - {}\n", "Additional property expertGroup is not allowed"),
    "unknown-group-key": ("expertGroups:\n  - replica: 2\n", "Additional property replica is not allowed"),
    "bad-device-count": ("expertDefaults:\n  devices:\n    nvidia.com/gpu: 0\n", "nvidia.com/gpu"),
    "bad-device-name": ("sharedExpert:\n  devices:\n    gpu: 1\n", "sharedExpert.devices"),
    "host-path-without-path": ("checkpoint:\n  source: hostPath\n", "checkpoint.hostPath.path"),
    "unknown-checkpoint-source": ("checkpoint:\n  source: s3\n", "checkpoint.source"),
    "bad-routing": ("router:\n  routing: random\n", "router.routing"),
    "port-out-of-range": ("ports:\n  grpc: 70000\n", "ports.grpc"),
    "bad-weights": ("expertDefaults:\n  weights: bf16\n", "expertDefaults.weights"),
    "bad-otlp-endpoint": ("telemetry:\n  otlpEndpoint: collector:4317\n", "telemetry.otlpEndpoint"),
    "long-fullname": ("fullnameOverride: " + "a" * 39 + "\n", "fullnameOverride"),
    "extra-config-repeats-chart-setting": ("router:\n  extraConfig:\n    routing: top-k\n", "router.extraConfig.routing"),
    "autoscaling-min-above-max": ("gateway:\n  autoscaling:\n    minReplicas: 5\n    maxReplicas: 2\n", "gateway.autoscaling"),
    "operator-without-metrics": (
        "metrics:\n  enabled: false\nmonitoring:\n  prometheusOperator:\n    enabled: true\n",
        "monitoring.prometheusOperator.enabled",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_rejected(case, tmp_path):
    text, expected = BAD_VALUES[case]
    values_file = tmp_path / f"{case}.yaml"
    values_file.write_text(text)

    result = run_helm(*template_args(values_file))

    assert result.returncode != 0, f"{case}: helm template accepted\n{text}"
    assert expected in result.stderr, f"{case}: expected {expected!r} in the error:\n{result.stderr}"

"""Telemetry of the split deployment, read through a real Prometheus server.

The router, eight expert groups, the shared expert and the gateway run as
separate processes on a checkpoint with a skewed router. A Prometheus server
(Debian's package, installed by scripts/prometheus.sh) scrapes every service
on loopback. Requests on layer 0 use MoGE routing and on layer 1 top-K, so
one deployment shows both. Every expected count comes from the experts each
response reports, not from the services' own metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import REPO_ROOT, MogeCkpt
from stack import Stack, binary_path

GROUPS = 8
EXPERTS_PER_GROUP = 8
TOKENS_PER_REQUEST = 16
REQUESTS_PER_MODE = 30
SCRAPE_INTERVAL_SECONDS = 1
PROMETHEUS_TIMEOUT_SECONDS = 30
DASHBOARD = REPO_ROOT / "helm" / "moge-serve" / "files" / "dashboard.json"
ALERTS = REPO_ROOT / "helm" / "moge-serve" / "files" / "alerts.yaml"
ALERT_TESTS = REPO_ROOT / "tests" / "prometheus" / "alerts_test.yaml"
# Layer and routing mode of each load phase.
PHASES = {0: "moge", 1: "top-k"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; run scripts/prometheus.sh (scripts/test.sh does)", pytrace=False)
    return path


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def skewed_checkpoint(moge_ckpt: MogeCkpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moge_ckpt.generate(tmp_path_factory.mktemp("checkpoint-skewed"), "--router-skew", "2.0", "--seed", "11")


@pytest.fixture(scope="module")
def stack(skewed_checkpoint: Path):
    deployment = Stack(skewed_checkpoint, groups=GROUPS)
    client = grpcclient.InferenceServerClient(deployment.url)
    deadline = time.monotonic() + 10
    while not client.is_server_ready():
        assert time.monotonic() < deadline, "the gateway did not turn ready within 10 s"
        time.sleep(0.05)
    yield deployment
    assert deployment.stop() == 0, "the gateway did not exit cleanly on SIGTERM"


class Prometheus:
    """A Prometheus server on loopback that scrapes every service of a stack each second."""

    def __init__(self, targets: list[str], directory: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = directory / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "moge-serve", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.log = open(directory / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [
                require("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT_SECONDS
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail("prometheus did not become ready:\n" + (directory / "prometheus.log").read_text())
            time.sleep(0.2)

    def query(self, expression: str) -> list[dict]:
        """Run an instant query and return its vector."""
        body = get_json(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def by_label(self, expression: str, label: str) -> dict[str, float]:
        return {sample["metric"][label]: float(sample["value"][1]) for sample in self.query(expression)}

    def wait_for(self, expression: str, label: str, expected: dict[str, float]) -> dict[str, float]:
        """Poll until the query returns `expected` by `label`, as scrapes catch up; return the last result."""
        deadline = time.monotonic() + PROMETHEUS_TIMEOUT_SECONDS
        while True:
            found = self.by_label(expression, label)
            if found == expected or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory):
    targets = [service.metrics_address for service in stack.services()]
    assert all(targets), "every service must log its metrics address"
    server = Prometheus(targets, tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def load(stack: Stack, prometheus: Prometheus) -> dict[int, dict]:
    """Send the requests of both phases one at a time, so each is its own batch.

    Returns, per layer, the assignments each group must have computed and the
    imbalance score of every batch, both derived from the reported experts.
    """
    client = grpcclient.InferenceServerClient(stack.url)
    rng = np.random.default_rng()
    expected = {}
    for layer, mode in PHASES.items():
        per_group = np.zeros(GROUPS, dtype=np.int64)
        scores = []
        for _ in range(REQUESTS_PER_MODE):
            hidden = rng.standard_normal((TOKENS_PER_REQUEST, 512)).astype(np.float32)
            tensor = grpcclient.InferInput("hidden_states", list(hidden.shape), "FP32")
            tensor.set_data_from_numpy(hidden)
            result = client.infer(
                "moge",
                [tensor],
                outputs=[grpcclient.InferRequestedOutput("expert_ids")],
                parameters={"layer": layer, "routing": mode},
            )
            counts = np.bincount(result.as_numpy("expert_ids").ravel() // EXPERTS_PER_GROUP, minlength=GROUPS)
            per_group += counts
            scores.append((counts.max() - counts.min()) / TOKENS_PER_REQUEST)
        expected[layer] = {"per_group": per_group, "scores": scores}
    return expected


def test_every_service_is_scraped(stack: Stack, prometheus: Prometheus, load: dict[int, dict]):
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_SECONDS
    while True:
        targets = get_json(prometheus.url + "/api/v1/targets")["data"]["activeTargets"]
        health = {target["scrapeUrl"]: target["health"] for target in targets}
        if len(health) == len(stack.services()) and set(health.values()) == {"up"}:
            break
        assert time.monotonic() < deadline, f"targets not all up: {health}"
        time.sleep(0.5)


def test_moge_loads_every_group_equally(prometheus: Prometheus, load: dict[int, dict]):
    expected = {str(group): float(count) for group, count in enumerate(load[0]["per_group"])}
    assert len(set(expected.values())) == 1, f"MoGE responses report unequal groups: {expected}"

    found = prometheus.wait_for('moge_device_assignments_total{layer="0",group!="shared"}', "group", expected)

    assert found == expected


def test_moge_imbalance_score_is_zero(prometheus: Prometheus, load: dict[int, dict]):
    count = prometheus.wait_for(
        'moge_router_imbalance_score_count{layer="0",mode="moge"}', "mode", {"moge": float(REQUESTS_PER_MODE)}
    )
    assert count == {"moge": float(REQUESTS_PER_MODE)}
    assert prometheus.by_label('moge_router_imbalance_score_sum{layer="0",mode="moge"}', "mode") == {"moge": 0.0}
    # Over the cumulative buckets: a rate needs two scrapes after the load.
    p99 = prometheus.query('histogram_quantile(0.99, sum by (le) (moge_router_imbalance_score_bucket{mode="moge"}))')
    assert float(p99[0]["value"][1]) == 0.0


def test_top_k_loads_groups_unequally(prometheus: Prometheus, load: dict[int, dict]):
    per_group = load[1]["per_group"]
    expected = {str(group): float(count) for group, count in enumerate(per_group)}
    assert per_group.sum() == REQUESTS_PER_MODE * TOKENS_PER_REQUEST * 8
    assert per_group.max() > per_group.min(), "top-K on a skewed router should favour some groups"

    found = prometheus.wait_for('moge_device_assignments_total{layer="1",group!="shared"}', "group", expected)

    assert found == expected


def test_top_k_imbalance_score_matches_batches(prometheus: Prometheus, load: dict[int, dict]):
    scores = load[1]["scores"]
    prometheus.wait_for(
        'moge_router_imbalance_score_count{layer="1",mode="top-k"}', "mode", {"top-k": float(REQUESTS_PER_MODE)}
    )

    total = prometheus.by_label('moge_router_imbalance_score_sum{layer="1",mode="top-k"}', "mode")["top-k"]

    assert total > 0
    assert total == pytest.approx(sum(scores), rel=1e-9)


def test_balance_report_matches_responses(stack: Stack, load: dict[int, dict]):
    report = get_json(stack.http_url + "/v1/balance")
    totals = {group["group"]: group["assignments_total"] for group in report["groups"]}
    expected = load[0]["per_group"] + load[1]["per_group"]

    assert report["routing_mode"] == "moge"
    assert [totals[str(group)] for group in range(GROUPS)] == expected.tolist()
    assert totals["shared"] == 2 * REQUESTS_PER_MODE * TOKENS_PER_REQUEST
    modes = {mode["mode"]: mode for mode in report["modes"]}
    assert modes["moge"]["imbalance_score_max"] == 0.0
    assert modes["top-k"]["imbalance_score"] == pytest.approx(np.mean(load[1]["scores"]), rel=1e-9)
    assert modes["moge"]["batches_total"] == REQUESTS_PER_MODE


def test_routing_mode_gauge(prometheus: Prometheus, load: dict[int, dict]):
    assert prometheus.by_label("moge_router_routing_mode", "mode") == {"moge": 1.0}


def exported_names(stack: Stack) -> set[str]:
    """Names of every series the services export, read from their /metrics endpoints."""
    names = set()
    for service in stack.services():
        with urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line and not line.startswith("#"):
                    names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def metric_names(expression: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers and `by (...)` lists."""
    bare = re.sub(r"by \([^)]*\)", "", re.sub(r"\{[^}]*\}", "", expression))
    return set(re.findall(r"\b(?:moge|rpc)_[a-z_]+\b", bare))


def test_dashboard_uses_only_exported_metrics(stack: Stack, load: dict[int, dict]):
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    referenced = set().union(*map(metric_names, expressions))
    exported = exported_names(stack)

    assert len(dashboard["panels"]) >= 10
    assert referenced, "the dashboard queries no moge-serve metric"
    assert referenced <= exported, f"not exported: {sorted(referenced - exported)}"


def test_alert_rules_pass_promtool():
    promtool = require("promtool")

    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    tested = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name], capture_output=True, text=True, cwd=ALERT_TESTS.parent
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alert_rules_use_only_exported_metrics(stack: Stack, load: dict[int, dict]):
    referenced = metric_names(ALERTS.read_text())
    exported = exported_names(stack)

    assert referenced <= exported, f"not exported: {sorted(referenced - exported)}"


def test_balance_command_prints_every_device(stack: Stack, load: dict[int, dict]):
    process = subprocess.run(
        [str(binary_path("moge-ctl")), "balance", "--gateway", stack.http_url],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert process.returncode == 0, process.stderr
    rows = {line.split()[0]: line.split() for line in process.stdout.splitlines() if line[:1].isdigit()}
    assert sorted(rows) == [str(group) for group in range(GROUPS)]
    expected = load[0]["per_group"] + load[1]["per_group"]
    for group, row in rows.items():
        assert int(row[3]) == expected[int(group)], f"total of group {group}: {row}"
    assert "top-k" in process.stdout
    assert "default routing mode: moge" in process.stdout

"""The moge-serve deployment as separate processes on free loopback ports, for end-to-end tests.

Every service is started as a user would start it and stopped with SIGTERM. Each one
also serves Prometheus metrics on a free port (MOGE_METRICS_PORT=0), which its log
reports.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 20


def binary_path(name: str) -> Path:
    """Return the release binary `name`, or the path in MOGE_<NAME>; fail the test when it is missing."""
    binary = Path(os.environ.get(f"MOGE_{name.upper().replace('-', '_')}", REPO_ROOT / "target" / "release" / name))
    if not binary.is_file():
        pytest.fail(f"{name} not found at {binary}; build it with `cargo build --release`", pytrace=False)
    return binary


def log_field(line: str, name: str) -> str | None:
    """Return the value of `name=` in a log line, without quotes."""
    for field in line.split():
        if field.startswith(name + "="):
            return field.split("=", 1)[1].strip('"')
    return None


class Service:
    """One moge-serve binary on free loopback ports.

    `addresses` maps each gRPC or HTTP service name from the "listening" log lines
    to its address; `metrics_address` is where /metrics is served.
    """

    def __init__(self, name: str, args: list[str], services: tuple[str, ...], env: dict[str, str] | None = None):
        self.name = name
        self.process = subprocess.Popen(
            [str(binary_path(name)), *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "info", "MOGE_METRICS_PORT": "0", **(env or {})},
        )
        self.log: list[str] = []
        self.addresses: dict[str, str] = {}
        self.metrics_address: str | None = None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stderr], daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not all(service in self.addresses for service in services):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"{name} did not log where it listens in time:\n" + "".join(self.log))
            self.log.append(line)
            if "listening" in line:
                self.addresses[log_field(line, "service")] = log_field(line, "address")
            elif "metrics endpoint ready" in line:
                self.metrics_address = log_field(line, "address")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=STOP_TIMEOUT_SECONDS)


class Stack:
    """The deployment as separate processes: the router, every expert group with
    `replicas[group]` replicas (one where not listed), the shared expert and the gateway."""

    def __init__(
        self,
        checkpoint: Path,
        groups: int = 8,
        replicas: dict[int, int] | None = None,
        expert_args: tuple[str, ...] = ("--compute-threads", "1"),
        extra_args: tuple[str, ...] = (),
    ):
        common = ["--checkpoint", str(checkpoint), "--grpc-port", "0", *extra_args]
        self.parts = [Service("moge-router", common, ("moge.v1.Router",))]
        router = self.parts[0].addresses["moge.v1.Router"]
        group_flags = []
        for group in range(groups):
            urls = []
            for _ in range((replicas or {}).get(group, 1)):
                expert = Service("moge-expert", [*common, "--group", str(group), *expert_args], ("moge.v1.ExpertGroup",))
                self.parts.append(expert)
                urls.append("http://" + expert.addresses["moge.v1.ExpertGroup"])
            group_flags += ["--group", ",".join(urls)]
        shared = Service("moge-expert", [*common, "--shared-expert", *expert_args], ("moge.v1.ExpertGroup",))
        self.parts.append(shared)
        self.gateway = Service(
            "moge-gateway",
            [
                "--grpc-port", "0", "--http-port", "0", *extra_args,
                "--router", f"http://{router}",
                "--shared-expert", "http://" + shared.addresses["moge.v1.ExpertGroup"],
                *group_flags,
            ],
            ("inference.GRPCInferenceService", "kserve-http"),
        )
        self.url = self.gateway.addresses["inference.GRPCInferenceService"]
        self.http_url = "http://" + self.gateway.addresses["kserve-http"]

    def services(self) -> list[Service]:
        """Every process, the gateway last."""
        return [*self.parts, self.gateway]

    def stop(self) -> int:
        """Stop the gateway, then every part; return the gateway's exit status."""
        status = self.gateway.stop()
        for part in self.parts:
            part.stop()
        return status

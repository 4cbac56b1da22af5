"""End-to-end benchmark of moge-serve, side by side in one run on one machine and checkpoint.

(a) the layer in process (moge-bench); (b) the embedded stack through the gateway;
(c) the services as separate processes; (d) Triton's perf_analyzer against (b);
(e) a KServe Python model server running the same layer with PyTorch. moge-load drives
(b), (c) and (e) with the same loads: a decode shape (64 clients, one token per
request) and a prefill shape (512 tokens per request). It also measures (b) with
telemetry on and off, and MoGE against top-K routing on a skewed router with every
group capped to an equal CPU share ("balance pays"). The `memory` part, run on its
own, records each process's peak RSS next to its weights on the balance preset.

Writes every raw report to .cache/bench/e2e/ and prints Markdown for docs/benchmarks.md.
Run it through scripts/bench-e2e.sh, which builds the binaries and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release"
OUT = REPO / ".cache" / "bench" / "e2e"
CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A server process; waits until its log contains `ready` (a regular expression)."""

    def __init__(self, args: list[str], ready: str, log_name: str, env: dict | None = None, timeout: float = 120):
        self.log_path = OUT / f"{log_name}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO
        )
        deadline = time.monotonic() + timeout
        while not re.search(ready, self.log_path.read_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"{args[0]} did not start; see {self.log_path}")
            time.sleep(0.1)

    def field(self, pattern: str) -> str:
        return re.search(pattern, self.log_path.read_text()).group(1)

    def peak_rss_bytes(self) -> int:
        """VmHWM of the running process."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def moge_load(target: str, name: str, *args: str, gateway_http: str | None = None) -> dict:
    report = OUT / f"load-{name}.json"
    command = [str(BIN / "moge-load"), "--target", target, "--json", str(report), *args]
    if gateway_http:
        command += ["--gateway-http", gateway_http]
    # Exit status 3 means some calls failed: the report counts them by status.
    finished = subprocess.run(command, stderr=subprocess.DEVNULL, cwd=REPO)
    if finished.returncode not in (0, 3):
        raise subprocess.CalledProcessError(finished.returncode, command)
    result = json.loads(report.read_text())
    print(f"  {name}: {result['throughput']['tokens_per_second']:.0f} tokens/s, errors {result['errors']}", file=sys.stderr)
    return result


def decode_load(target, name, requests, **kwargs):
    return moge_load(target, name, "--tokens", "1", "--requests", str(requests), "--concurrency", "64", **kwargs)


def prefill_load(target, name, requests, **kwargs):
    return moge_load(target, name, "--tokens", "512", "--requests", str(requests), "--concurrency", "4", **kwargs)


def single_load(target, name, requests):
    return moge_load(target, name, "--tokens", "1", "--requests", str(requests), "--concurrency", "1")


def in_process(checkpoint: Path) -> dict:
    report = OUT / "in-process.json"
    subprocess.run(
        [str(BIN / "moge-bench"), "--checkpoint", str(checkpoint), "--tokens", "1,32,64,512", "--seconds", "3",
         "--no-ceilings", "--json", str(report)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return {row["tokens"]: row for row in json.loads(report.read_text())["layer"]}


def start_embedded(checkpoint: Path, name: str, *extra: str) -> tuple[Process, str, str]:
    grpc, http = free_port(), free_port()
    gateway = Process(
        [str(BIN / "moge-gateway"), "--checkpoint", str(checkpoint), "--grpc-port", str(grpc),
         "--http-port", str(http), "--metrics-port", "0", *extra],
        r"service=\"kserve-http\"", name,
    )
    return gateway, f"127.0.0.1:{grpc}", f"http://127.0.0.1:{http}"


class Split:
    """Router, eight groups, the shared expert and the gateway as separate processes.

    With `cpu_share`, every group's process runs in its own cgroup capped at that
    fraction of one CPU, so that each group behaves as a device of fixed speed.
    The router, the shared expert and the gateway stay uncapped.
    """

    def __init__(self, checkpoint: Path, name: str, groups: int = 8, cpu_share: float | None = None):
        self.parts: list[Process] = []
        self.cgroups: list[Path] = []
        common = ["--checkpoint", str(checkpoint), "--grpc-port", "0", "--metrics-port", "0"]

        def start(binary, args, log, capped=False):
            process = Process([str(BIN / binary), *common, *args], r"listening address=", log)
            self.parts.append(process)
            if capped and cpu_share is not None:
                cgroup = CGROUP_ROOT / f"moge-bench-{log}"
                cgroup.mkdir(exist_ok=True)
                (cgroup / "cpu.cfs_period_us").write_text("10000")
                (cgroup / "cpu.cfs_quota_us").write_text(str(int(10000 * cpu_share)))
                (cgroup / "cgroup.procs").write_text(str(process.process.pid))
                self.cgroups.append(cgroup)
            return "http://" + process.field(r"listening address=(\S+)")

        router = start("moge-router", [], f"{name}-router")
        group_urls = []
        for group in range(groups):
            group_urls += ["--group", start("moge-expert", ["--group", str(group), "--compute-threads", "1"],
                                            f"{name}-group-{group}", capped=True)]
        shared = start("moge-expert", ["--shared-expert", "--compute-threads", "1"], f"{name}-shared")
        grpc, http = free_port(), free_port()
        self.gateway = Process(
            [str(BIN / "moge-gateway"), "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", "0",
             "--router", router, "--shared-expert", shared, *group_urls],
            r"service=\"kserve-http\"", f"{name}-gateway",
        )
        self.target = f"127.0.0.1:{grpc}"
        self.http = f"http://127.0.0.1:{http}"

    def memory(self) -> list[dict]:
        """Peak RSS of every process next to the bytes of weights it hosts."""
        rows = []
        for process in [*self.parts, self.gateway]:
            log = process.log_path.read_text()
            weights = re.search(r"weight_bytes=(\d+)", log)
            rows.append({
                "process": process.log_path.stem,
                "peak_rss_bytes": process.peak_rss_bytes(),
                "weight_bytes": int(weights.group(1)) if weights else None,
            })
        return rows

    def stop(self):
        self.gateway.stop()
        for part in self.parts:
            part.stop()
        for cgroup in self.cgroups:
            cgroup.rmdir()


def perf_analyzer(target: str, hidden_size: int) -> dict:
    """Triton's perf_analyzer at 64 concurrent one-token requests, or None when it is not installed."""
    binary = shutil.which("perf_analyzer") or os.environ.get("PERF_ANALYZER")
    if not binary:
        print("  perf_analyzer not found; skipped", file=sys.stderr)
        return {}
    import random

    data = OUT / "perf-analyzer-input.json"
    rows = [{"hidden_states": {"content": [random.gauss(0, 1) for _ in range(hidden_size)], "shape": [1, hidden_size]}}
            for _ in range(16)]
    data.write_text(json.dumps({"data": rows}))
    csv = OUT / "perf-analyzer.csv"
    output = subprocess.run(
        [binary, "-m", "moge", "-u", target, "-i", "grpc", "--input-data", str(data), "--concurrency-range", "64",
         "-p", "5000", "-f", str(csv)],
        capture_output=True, text=True, check=True,
    ).stdout
    (OUT / "perf-analyzer.txt").write_text(output)
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", output).group(1))
    p50 = float(re.search(r"p50 latency: (\d+) usec", output).group(1)) / 1e6
    p99 = float(re.search(r"p99 latency: (\d+) usec", output).group(1)) / 1e6
    print(f"  perf_analyzer: {throughput:.0f} infer/s", file=sys.stderr)
    return {"tokens_per_second": throughput, "p50": p50, "p99": p99}


def start_kserve(checkpoint: Path, dtype: str) -> tuple[Process, str]:
    grpc, http = free_port(), free_port()
    server = Process(
        [sys.executable, str(REPO / "bench" / "python" / "kserve_layer.py"), "--checkpoint", str(checkpoint),
         "--grpc-port", str(grpc), "--http-port", str(http), "--dtype", dtype, "--threads", str(os.cpu_count())],
        r"Application startup complete", f"kserve-{dtype}", env={"MKL_THREADING_LAYER": "GNU"},
    )
    return server, f"127.0.0.1:{grpc}"


def ensure_checkpoint(path: Path, preset: str, *args: str):
    if not (path / "config.json").exists():
        subprocess.run([str(BIN / "moge-ckpt"), "generate", "--preset", preset, "--out", str(path), *args],
                       check=True, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-requests", type=int, default=20000)
    parser.add_argument("--prefill-requests", type=int, default=200)
    parser.add_argument("--balance-requests", type=int, default=40)
    parser.add_argument("--balance-preset", choices=["small", "pangu-pro-moe"], default="pangu-pro-moe",
                        help="checkpoint shape of the balance run; the small preset's experts are too small for "
                             "their time to follow their assignments")
    parser.add_argument("--balance-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (b) with telemetry on, then off; more rounds narrow the telemetry cost")
    parser.add_argument("--group-cpu-share", type=float, default=0.15,
                        help="CPU cap of each expert process in the balance run, as a fraction of one CPU")
    parser.add_argument("--parts", default="a,b,c,e,balance",
                        help="comma-separated parts to run, of a, b, c, e, balance and memory; "
                             "the Markdown needs the first five")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    checkpoint = REPO / ".cache" / "bench" / "small"
    skewed = REPO / ".cache" / "bench" / f"{args.balance_preset}-skewed"
    ensure_checkpoint(checkpoint, "small")
    if parts & {"balance", "memory"}:
        ensure_checkpoint(skewed, args.balance_preset, "--router-skew", "2.0", "--seed", "11")
    results: dict = {"date": str(date.today()), "machine": machine()}

    if "a" in parts:
        print("(a) in process", file=sys.stderr)
        results["a"] = in_process(checkpoint)

    if "b" in parts:
        print("(b) embedded stack, telemetry on and off, and (d) perf_analyzer", file=sys.stderr)
        for round_ in range(args.rounds):
            for telemetry in ("on", "off"):
                extra = () if telemetry == "on" else ("--disable-metrics",)
                gateway, target, http = start_embedded(checkpoint, f"embedded-{telemetry}-{round_}", *extra)
                key = f"b-{telemetry}-{round_}"
                results[key] = {
                    "decode": decode_load(target, f"{key}-decode", args.decode_requests),
                    "prefill": prefill_load(target, f"{key}-prefill", args.prefill_requests),
                }
                if round_ == 0 and telemetry == "on":
                    results["b-single"] = single_load(target, "b-single", 2000)
                    results["d"] = perf_analyzer(target, 512)
                gateway.stop()

    if "c" in parts:
        print("(c) separate processes", file=sys.stderr)
        split = Split(checkpoint, "split")
        results["c"] = {
            "decode": decode_load(split.target, "c-decode", args.decode_requests),
            "prefill": prefill_load(split.target, "c-prefill", args.prefill_requests),
        }
        results["c-memory"] = split.memory()
        split.stop()

    if "e" in parts:
        for dtype in ("bfloat16", "float32"):
            print(f"(e) KServe with PyTorch {dtype}", file=sys.stderr)
            server, target = start_kserve(checkpoint, dtype)
            results[f"e-{dtype}"] = {
                "decode": decode_load(target, f"e-{dtype}-decode", max(2000, args.decode_requests // 10)),
                "prefill": prefill_load(target, f"e-{dtype}-prefill", args.prefill_requests),
            }
            server.stop()

    if "balance" in parts:
        print("balance: MoGE against top-K, every group capped", file=sys.stderr)
        capped = os.access(CGROUP_ROOT, os.W_OK)
        if not capped:
            print(f"  {CGROUP_ROOT} is not writable: groups run uncapped", file=sys.stderr)
        split = Split(skewed, "balance", cpu_share=args.group_cpu_share if capped else None)
        results["balance"] = {
            "capped": capped,
            "cpu_share": args.group_cpu_share,
            "preset": args.balance_preset,
            "tokens": args.balance_tokens,
        }
        for mode in ("moge", "top-k"):
            # Pangu-sized experts: each group's time grows with its
            # assignments, as on a device, rather than with the experts it reads.
            results["balance"][mode] = moge_load(
                split.target, f"balance-{mode}", "--tokens", str(args.balance_tokens),
                "--requests", str(args.balance_requests),
                "--concurrency", "2", "--routing", mode, gateway_http=split.http,
            )
        split.stop()

    if "memory" in parts:
        print(f"memory: separate processes on {args.balance_preset}, uncapped", file=sys.stderr)
        split = Split(skewed, "memory")
        results["memory"] = {
            "preset": args.balance_preset,
            "decode": decode_load(split.target, "memory-decode", 2000),
            "prefill": prefill_load(split.target, "memory-prefill", 16),
            "processes": split.memory(),
        }
        split.stop()

    name = "results.json" if parts >= {"a", "b", "c", "e", "balance"} else f"results-{'-'.join(sorted(parts))}.json"
    (OUT / name).write_text(json.dumps(results, indent=2))
    if parts >= {"a", "b", "c", "e", "balance"}:
        print(markdown(results))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def mean(values):
    return sum(values) / len(values)


def markdown(results: dict) -> str:
    a = results["a"]
    tps = lambda report: report["throughput"]["tokens_per_second"]  # noqa: E731
    rounds = sum(1 for key in results if key.startswith("b-on-"))
    b = {shape: mean([tps(results[f"b-on-{r}"][shape]) for r in range(rounds)]) for shape in ("decode", "prefill")}
    b_off = {shape: mean([tps(results[f"b-off-{r}"][shape]) for r in range(rounds)]) for shape in ("decode", "prefill")}
    c = {shape: tps(results["c"][shape]) for shape in ("decode", "prefill")}
    in_process = {"decode": a[64]["tokens_per_s"], "prefill": a[512]["tokens_per_s"]}
    lines = [
        f"Date: {results['date']}. Machine: {results['machine']}. Checkpoint: the `small` preset, layer 0, FP32 requests.",
        "",
        "| shape | (a) in process | (b) embedded | (b)/(a) | (c) processes | (c)/(a) | (e) KServe + PyTorch bf16 | (b)/(e) | (e) PyTorch f32 | (b)/(e) f32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, label in (("decode", "decode: 64 clients, 1 token"), ("prefill", "prefill: 4 clients, 512 tokens")):
        e16 = tps(results["e-bfloat16"][shape])
        e32 = tps(results["e-float32"][shape])
        lines.append(
            f"| {label} | {in_process[shape]:.0f} | {b[shape]:.0f} | {b[shape] / in_process[shape]:.2f} | {c[shape]:.0f} "
            f"| {c[shape] / in_process[shape]:.2f} | {e16:.0f} | {b[shape] / e16:.2f} | {e32:.0f} | {b[shape] / e32:.2f} |"
        )
    single = results["b-single"]["latency_seconds"]["prefill"]
    lines += [
        "",
        f"(a) at T=32, the batch size that 64 clients give with two batches in flight: "
        f"{a[32]['tokens_per_s']:.0f} tokens/s.",
        "",
        f"One-token latency, one client: (a) {a[1]['layer_ms']:.3f} ms in process; (b) p50 {single['p50'] * 1e3:.3f} ms, "
        f"p99 {single['p99'] * 1e3:.3f} ms through the gateway: {single['p50'] * 1e3 - a[1]['layer_ms']:.3f} ms added at p50.",
        "",
        "| (b) decode, 64 clients | tokens/s | p50 | p99 |",
        "| --- | --- | --- | --- |",
    ]
    b_decode = results["b-on-0"]["decode"]
    lines.append(f"| moge-load | {tps(b_decode):.0f} | {b_decode['latency_seconds']['prefill']['p50'] * 1e3:.2f} ms "
                 f"| {b_decode['latency_seconds']['prefill']['p99'] * 1e3:.2f} ms |")
    if results.get("d"):
        d = results["d"]
        lines.append(f"| perf_analyzer | {d['tokens_per_second']:.0f} | {d['p50'] * 1e3:.2f} ms | {d['p99'] * 1e3:.2f} ms |")
    lines += [
        "",
        "| telemetry | decode tokens/s | prefill tokens/s |",
        "| --- | --- | --- |",
        f"| on (metrics endpoint, no OTLP) | {b['decode']:.0f} | {b['prefill']:.0f} |",
        f"| off (`--disable-metrics`) | {b_off['decode']:.0f} | {b_off['prefill']:.0f} |",
        f"| cost | {100 * (1 - b['decode'] / b_off['decode']):.1f}% | {100 * (1 - b['prefill'] / b_off['prefill']):.1f}% |",
    ]
    lines += [
        "",
        "Peak RSS of each process of (c) after its loads, next to the weights it hosts:",
        "",
        "| process | weights | peak RSS | overhead |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["c-memory"]:
        weights = row["weight_bytes"]
        rss = row["peak_rss_bytes"] / 2**20
        if weights:
            lines.append(f"| {row['process']} | {weights / 2**20:.1f} MiB | {rss:.1f} MiB | {rss - weights / 2**20:.1f} MiB |")
        else:
            lines.append(f"| {row['process']} | - | {rss:.1f} MiB | - |")
    balance = results["balance"]
    lines += [
        "",
        f"Balance, `{balance['preset']}` checkpoint with a skewed router (`--router-skew 2.0`), each group's "
        f"process capped at {balance['cpu_share']:.0%} of a CPU "
        f"({'cgroup cpu quota' if balance['capped'] else 'NOT capped'}), 2 clients, "
        f"{balance['tokens']} tokens per request:",
        "",
        "| routing | tokens/s | p50 | p99 | imbalance score | straggler gap mean | straggler gap max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("moge", "top-k"):
        report = balance[mode]
        modes = {entry["mode"]: entry for entry in report["balance"]["modes"]}
        stats = modes.get(mode, {})
        latency = report["latency_seconds"]["prefill"]
        lines.append(
            f"| {mode} | {tps(report):.0f} | {latency['p50'] * 1e3:.1f} ms | {latency['p99'] * 1e3:.1f} ms "
            f"| {stats.get('imbalance_score', 0):.3f} | {stats.get('straggler_gap_seconds', 0) * 1e3:.2f} ms "
            f"| {stats.get('straggler_gap_seconds_max', 0) * 1e3:.2f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

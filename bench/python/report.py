"""Turns the JSON of scripts/bench-core.sh into Markdown tables of ratios."""

import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path


def load(path):
    return json.loads(Path(path).read_text())


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    results = Path(sys.argv[1])
    print(f"Date: {date.today()}. Machine: {cpu_name()}, {subprocess.getoutput('nproc')} cores, "
          f"{platform.system()} {platform.release()}.")
    ceilings = load(results / "ceilings.json")
    gemm = ceilings["gemm_gflops"]
    bandwidth = ceilings["read_gb_per_s"]
    for preset in ("pangu-pro-moe", "small"):
        stored = load(results / f"rust-{preset}-stored.json")
        as_f32 = load(results / f"rust-{preset}-f32.json")
        torch32 = load(results / f"torch-{preset}-float32.json")
        torch16 = load(results / f"torch-{preset}-bfloat16.json")
        print(f"\n### {preset}\n")
        print(f"Ceilings in this run: sgemm (matrixmultiply) {gemm:.1f} GFLOP/s, "
              f"torch f32 matmul {torch32['torch_matmul_gflops']:.1f} GFLOP/s, "
              f"read bandwidth {bandwidth:.1f} GB/s; {stored['threads']} threads; "
              f"kernel {stored['kernel']}; torch {torch32['torch']}.\n")
        for name, run in (("bf16 weights", stored), ("f32 weights", as_f32)):
            weights = run["expert_weight_bytes"]
            rss = run["peak_rss_bytes"]
            print(f"Peak RSS with {name}: {rss / 1e9:.2f} GB for {weights / 1e9:.2f} GB of expert weights "
                  f"({rss / weights - 1:+.0%}).\n")
        print("| T | route ms | tokens/s (bf16 weights) | GFLOP/s | of sgemm | weight GB/s | of read BW "
              "| tokens/s (f32 weights) | torch f32 tokens/s | vs torch f32 | torch bf16 tokens/s | vs torch bf16 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row, row32, t32, t16 in zip(stored["layer"], as_f32["layer"], torch32["layer"], torch16["layer"]):
            print(f"| {row['tokens']} | {row['route_ms']:.3f} | {row['tokens_per_s']:.1f} | {row['gflops']:.1f} | "
                  f"{row['gflops'] / gemm:.0%} | {row['weight_gb_per_s']:.1f} | "
                  f"{row['weight_gb_per_s'] / bandwidth:.0%} | {row32['tokens_per_s']:.1f} | "
                  f"{t32['tokens_per_s']:.1f} | {row['tokens_per_s'] / t32['tokens_per_s']:.2f}x | "
                  f"{t16['tokens_per_s']:.1f} | {row['tokens_per_s'] / t16['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()

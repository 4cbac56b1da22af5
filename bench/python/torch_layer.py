"""Eager PyTorch on CPU running the same MoGE layer as moge-serve.

Loads one layer of a moge-serve checkpoint (the Hugging Face layout) and times
the whole layer the way eager MoE implementations run it. That is a router
matmul, softmax and top-K' per group, then a loop over the experts that have
tokens (gather, SwiGLU, weighted index_add), plus the shared expert. It prints, and
optionally writes, tokens/s and GFLOP/s per batch size, next to torch's own
f32 matmul rate on this machine as a second ceiling.

Run it with the same thread count as the Rust benchmark (`--threads`).
"""

import argparse
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch


def read_safetensors(path, wanted):
    """Returns {name: torch tensor} for the names in `wanted` found in `path`."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__" or name not in wanted:
                continue
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=np.uint8)
            if info["dtype"] == "BF16":
                tensor = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
            elif info["dtype"] == "F16":
                tensor = torch.from_numpy(raw.view(np.float16).copy())
            elif info["dtype"] == "F32":
                tensor = torch.from_numpy(raw.view(np.float32).copy())
            else:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            tensors[name] = tensor.reshape(info["shape"])
    return tensors


def load_layer(checkpoint, layer, dtype):
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    n = config["num_experts"]
    prefix = f"model.layers.{layer}.mlp."
    names = [prefix + "gate.weight", prefix + "router_scale"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names += [f"{prefix}experts.{e}.{proj}.weight" for e in range(n)]
        names.append(f"{prefix}shared_expert.{proj}.weight")
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({weight_map[name] for name in names})
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(checkpoint / file, set(names)))

    def stack(proj):
        return torch.stack([tensors[f"{prefix}experts.{e}.{proj}.weight"] for e in range(n)]).to(dtype)

    return config, {
        "gate": tensors[prefix + "gate.weight"].float(),
        "router_scale": tensors[prefix + "router_scale"].float().reshape(-1),
        "gate_proj": stack("gate_proj"),
        "up_proj": stack("up_proj"),
        "down_proj": stack("down_proj"),
        "shared": [tensors[f"{prefix}shared_expert.{p}.weight"].to(dtype) for p in ("gate_proj", "up_proj", "down_proj")],
    }


def swiglu(x, gate, up, down):
    return torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x, gate)) * torch.nn.functional.linear(x, up), down
    )


def moge_layer(x, weights, config, dtype):
    """Run one MoGE layer: x [T, H] float32 -> [T, H] float32."""
    t = x.shape[0]
    n = config["num_experts"]
    k = config["num_experts_per_tok"]
    groups = config.get("n_group") or k
    per_group = n // groups
    per_tok = k // groups

    scores = torch.softmax(x @ weights["gate"].T, dim=-1)
    values, index = scores.view(t, groups, per_group).topk(per_tok, dim=-1)
    ids = (index + torch.arange(groups).view(1, groups, 1) * per_group).reshape(t, k)
    routing_weights = values.reshape(t, k) * weights["router_scale"][ids]

    xc = x.to(dtype)
    out = swiglu(xc, *weights["shared"]).float()
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n).tolist()
    rows_all = order // k
    weights_all = routing_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = rows_all[start : start + count]
        y = swiglu(xc[rows], weights["gate_proj"][expert], weights["up_proj"][expert], weights["down_proj"][expert])
        out.index_add_(0, rows, y.float() * weights_all[start : start + count, None])
        start += count
    return out


def timed(seconds, run):
    run()
    samples = []
    started = time.perf_counter()
    while len(samples) < 3 or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        run()
        samples.append(time.perf_counter() - begin)
    samples.sort()
    return samples[len(samples) // 2]


def matmul_ceiling():
    a = torch.ones(2048, 2048)
    b = torch.full((2048, 2048), 0.5)
    best = min(timed(0.0, lambda: a @ b) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--tokens", default="1,8,64,256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config, weights = load_layer(args.checkpoint, args.layer, dtype)
    h = config["hidden_size"]
    flops_per_token = 2 * (
        config["num_experts_per_tok"] * 3 * config["moe_intermediate_size"] * h
        + 3 * config["shared_expert_intermediate_size"] * h
        + config["num_experts"] * h
    )
    report = {"torch": torch.__version__, "threads": args.threads, "dtype": args.dtype, "layer": []}
    report["torch_matmul_gflops"] = matmul_ceiling()
    print(f"torch f32 matmul: {report['torch_matmul_gflops']:.1f} GFLOP/s", flush=True)
    with torch.inference_mode():
        for tokens in [int(v) for v in args.tokens.split(",")]:
            x = torch.randn(tokens, h)
            seconds = timed(args.seconds, lambda: moge_layer(x, weights, config, dtype))
            row = {
                "tokens": tokens,
                "layer_ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "gflops": flops_per_token * tokens / seconds / 1e9,
            }
            report["layer"].append(row)
            print(
                f"T={tokens:5}: {row['tokens_per_s']:10.1f} tokens/s {row['gflops']:7.1f} GFLOP/s "
                f"layer {row['layer_ms']:.3f} ms",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

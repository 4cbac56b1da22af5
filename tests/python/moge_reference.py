"""Float64 numpy reference of one MoGE layer, read straight from checkpoint bytes.

This module is deliberately independent of the Rust code. It parses
safetensors files itself and implements routing and the expert MLPs from the
written definition of the layer below, so that a misunderstanding shared by
both sides cannot make them agree.

Definition of one layer for hidden states x [T, H]:

* M groups of N/M consecutive experts (M = n_group if the config has it, else
  num_experts_per_tok K), K' = K/M experts per group and token, topk_group =
  the config value if present, else max(1, M // 2).
* scores s = softmax(x @ W_gate.T) over all N experts.
* Routing ``moge``: the K' best experts of every group, groups ascending and
  each group's experts by descending score. ``top-k``: the K best of all N
  by descending score. ``group-limited``: keep the topk_group groups with the
  highest max score, then the K best experts inside them by descending score.
  Ties go to the lower index.
* Weight of a chosen expert e: s[e] * router_scale[e], or with renormalize
  (s[e] / sum of the chosen s) * router_scale[e].
* expert(x) = down(silu(gate(x)) * up(x)) with W stored [out, in].
* output = shared_expert(x) + sum over chosen experts of weight * expert(x).
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROUTING_MODES = ("moge", "top-k", "group-limited")

# Relative score gap below which two candidates of one selection count as a
# near tie. The Rust side computes scores in f32, so the float64 order of
# candidates this close is not a reliable expectation for its choice. In one
# measurement on 80,000 tokens (top-k, small preset with --groups 4
# --router-skew 2.0) Rust's scores were within 1.3e-6 relative of float64. Its
# choice still differed only where the gap was below 1e-7, because the error of
# the softmax normalizer cancels when two scores are compared.
NEAR_TIE_RELATIVE_GAP = 1e-6

_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ELEMENT_SIZES = {name: dtype.itemsize for name, dtype in _NUMPY_DTYPES.items()} | {"BF16": 2}


# ---------------------------------------------------------------------------
# safetensors reading and writing


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Read the JSON header of a safetensors file.

    Returns the header (tensor entries and the optional ``__metadata__``) and
    the byte offset where the data section starts.
    """
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        if len(length_bytes) != 8:
            raise ValueError(f"{path}: file is shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", length_bytes)
        header_bytes = file.read(header_length)
    if len(header_bytes) != header_length:
        raise ValueError(f"{path}: header length {header_length} exceeds the file size")
    return json.loads(header_bytes.decode("utf-8")), 8 + header_length


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to the float32 values they encode exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 with round-to-nearest-even and return the uint16 bits.

    NaN and infinity inputs are not handled specially, because the tests only
    write finite values.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding_bias = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding_bias) >> 16).astype(np.uint16)


def decode_tensor(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    """Decode raw little-endian tensor bytes. BF16 comes back as float32, other dtypes as stored."""
    count = int(np.prod(shape, dtype=np.int64))
    expected_bytes = count * _ELEMENT_SIZES[dtype]
    if len(data) != expected_bytes:
        raise ValueError(f"tensor of dtype {dtype} and shape {shape} needs {expected_bytes} bytes, got {len(data)}")
    if dtype == "BF16":
        return bf16_bits_to_float32(np.frombuffer(data, dtype="<u2")).reshape(shape)
    return np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)


def read_safetensors(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read tensors from a safetensors file: all of them, or only ``names``."""
    header, data_start = read_safetensors_header(path)
    selected = [name for name in header if name != "__metadata__"] if names is None else names
    tensors = {}
    with open(path, "rb") as file:
        for name in selected:
            entry = header[name]
            begin, end = entry["data_offsets"]
            file.seek(data_start + begin)
            tensors[name] = decode_tensor(entry["dtype"], entry["shape"], file.read(end - begin))
    return tensors


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write a safetensors file from ``{name: (dtype, values)}``.

    For BF16 the values are rounded from float32 with round-to-nearest-even,
    for F16 and F32 they are cast with numpy's rounding.
    """
    header = {}
    chunks = []
    offset = 0
    for name, (dtype, values) in tensors.items():
        if dtype == "BF16":
            raw = float32_to_bf16_bits(values).astype("<u2").tobytes()
        else:
            raw = np.ascontiguousarray(values, dtype=_NUMPY_DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(np.shape(values)), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header).encode("utf-8")
    # The data section starts 8-byte aligned, as the safetensors format recommends.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for raw in chunks:
            file.write(raw)


def quantize(values: np.ndarray, dtype: str) -> np.ndarray:
    """Return the float64 values that ``write_safetensors`` stores for ``values`` in ``dtype``."""
    if dtype == "BF16":
        return bf16_bits_to_float32(float32_to_bf16_bits(values)).astype(np.float64)
    return np.asarray(values, dtype=np.float32).astype(_NUMPY_DTYPES[dtype]).astype(np.float64)


# ---------------------------------------------------------------------------
# Checkpoint


@dataclass(frozen=True)
class LayerConfig:
    """Layer shape and routing parameters taken from a checkpoint's config.json."""

    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    num_groups: int
    topk_group: int
    norm_topk_prob: bool

    @classmethod
    def from_config(cls, config: dict) -> LayerConfig:
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act is {config['hidden_act']!r}, the reference implements only 'silu'")
        top_k = config["num_experts_per_tok"]
        num_groups = config.get("n_group", top_k)
        return cls(
            hidden_size=config["hidden_size"],
            num_experts=config["num_experts"],
            top_k=top_k,
            intermediate_size=config["moe_intermediate_size"],
            shared_intermediate_size=config["shared_expert_intermediate_size"],
            num_groups=num_groups,
            topk_group=config.get("topk_group", max(1, num_groups // 2)),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def top_k_per_group(self) -> int:
        return self.top_k // self.num_groups


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights in float64, stacked per expert."""

    gate: np.ndarray  # [N, H] router weight
    router_scale: np.ndarray  # [N]
    expert_gate: np.ndarray  # [N, I, H]
    expert_up: np.ndarray  # [N, I, H]
    expert_down: np.ndarray  # [N, H, I]
    shared_gate: np.ndarray  # [I_shared, H]
    shared_up: np.ndarray  # [I_shared, H]
    shared_down: np.ndarray  # [H, I_shared]


def layer_tensor_shapes(config: LayerConfig, layer: int) -> dict[str, list[int]]:
    """Return the name and shape of every tensor a layer must have."""
    h, n = config.hidden_size, config.num_experts
    i, i_shared = config.intermediate_size, config.shared_intermediate_size
    prefix = f"model.layers.{layer}.mlp"
    shapes = {f"{prefix}.gate.weight": [n, h], f"{prefix}.router_scale": [1, n]}
    for expert in range(n):
        shapes[f"{prefix}.experts.{expert}.gate_proj.weight"] = [i, h]
        shapes[f"{prefix}.experts.{expert}.up_proj.weight"] = [i, h]
        shapes[f"{prefix}.experts.{expert}.down_proj.weight"] = [h, i]
    shapes[f"{prefix}.shared_expert.gate_proj.weight"] = [i_shared, h]
    shapes[f"{prefix}.shared_expert.up_proj.weight"] = [i_shared, h]
    shapes[f"{prefix}.shared_expert.down_proj.weight"] = [h, i_shared]
    return shapes


class Checkpoint:
    """A Hugging Face style checkpoint directory: config.json plus one or more safetensors files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.raw_config = json.loads((self.directory / "config.json").read_text())
        self.config = LayerConfig.from_config(self.raw_config)
        index_path = self.directory / "model.safetensors.index.json"
        if index_path.exists():
            self.weight_map = json.loads(index_path.read_text())["weight_map"]
        else:
            header, _ = read_safetensors_header(self.directory / "model.safetensors")
            self.weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}

    def read_tensors(self, names: list[str]) -> dict[str, np.ndarray]:
        """Read tensors by name from whichever files the weight map assigns them to."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file_name, file_names in by_file.items():
            tensors.update(read_safetensors(self.directory / file_name, file_names))
        return tensors

    def load_layer(self, layer: int) -> LayerWeights:
        """Load one layer's weights, dequantized to float64."""
        config = self.config
        prefix = f"model.layers.{layer}.mlp"
        tensors = self.read_tensors(list(layer_tensor_shapes(config, layer)))

        def get(name: str) -> np.ndarray:
            return tensors[f"{prefix}.{name}"].astype(np.float64)

        def stack(projection: str) -> np.ndarray:
            return np.stack([get(f"experts.{e}.{projection}.weight") for e in range(config.num_experts)])

        return LayerWeights(
            gate=get("gate.weight"),
            router_scale=get("router_scale").reshape(config.num_experts),
            expert_gate=stack("gate_proj"),
            expert_up=stack("up_proj"),
            expert_down=stack("down_proj"),
            shared_gate=get("shared_expert.gate_proj.weight"),
            shared_up=get("shared_expert.up_proj.weight"),
            shared_down=get("shared_expert.down_proj.weight"),
        )


# ---------------------------------------------------------------------------
# Routing


def router_scores(weights: LayerWeights, hidden: np.ndarray) -> np.ndarray:
    """Return the softmax scores [T, N] of the router over all experts."""
    logits = hidden @ weights.gate.T
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _rank_descending(values: np.ndarray) -> np.ndarray:
    """Return indices sorting the last axis by descending value, equal values by ascending index."""
    return np.argsort(-values, axis=-1, kind="stable")


def _near_tie(sorted_values: np.ndarray, boundary: int, check_order: bool) -> np.ndarray:
    """Flag rows whose selection of the first ``boundary`` of ``sorted_values`` is fragile.

    ``sorted_values`` is [..., C] in descending order. The boundary gap
    (last chosen against best unchosen) always counts. With ``check_order`` the
    gaps between adjacent chosen candidates count too, because their order
    appears in the output.
    """
    first = 0 if check_order else boundary - 1
    # Without an unchosen candidate only the gaps among the chosen remain.
    end = min(boundary, sorted_values.shape[-1] - 1)
    if end <= first:
        return np.zeros(sorted_values.shape[:-1], dtype=bool)
    upper = sorted_values[..., first:end]
    lower = sorted_values[..., first + 1 : end + 1]
    relative_gap = (upper - lower) / np.maximum(np.abs(upper), np.finfo(np.float64).tiny)
    return (relative_gap < NEAR_TIE_RELATIVE_GAP).any(axis=-1)


@dataclass(frozen=True)
class Routing:
    """Chosen experts [T, K] in output order, and a per-token near-tie flag [T]."""

    expert_ids: np.ndarray
    near_tie: np.ndarray


def route(config: LayerConfig, scores: np.ndarray, mode: str) -> Routing:
    """Choose K experts per token from the scores [T, N] with the given routing mode."""
    tokens = scores.shape[0]
    k = config.top_k
    if mode == "moge":
        per_group = config.top_k_per_group
        grouped = scores.reshape(tokens, config.num_groups, config.experts_per_group)
        order = _rank_descending(grouped)
        sorted_scores = np.take_along_axis(grouped, order, axis=-1)
        near_tie = _near_tie(sorted_scores, per_group, check_order=True).any(axis=-1)
        offsets = (np.arange(config.num_groups) * config.experts_per_group)[None, :, None]
        ids = (order[..., :per_group] + offsets).reshape(tokens, k)
        return Routing(ids, near_tie)

    if mode == "top-k":
        order = _rank_descending(scores)
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        return Routing(order[:, :k], _near_tie(sorted_scores, k, check_order=True))

    if mode == "group-limited":
        grouped = scores.reshape(tokens, config.num_groups, config.experts_per_group)
        group_scores = grouped.max(axis=-1)
        group_order = _rank_descending(group_scores)
        sorted_group_scores = np.take_along_axis(group_scores, group_order, axis=-1)
        # Only the boundary between kept and dropped groups matters, because
        # the experts are ordered by their own score afterwards.
        group_tie = _near_tie(sorted_group_scores, config.topk_group, check_order=False)
        kept_groups = np.zeros((tokens, config.num_groups), dtype=bool)
        np.put_along_axis(kept_groups, group_order[:, : config.topk_group], True, axis=-1)
        candidates = np.where(np.repeat(kept_groups, config.experts_per_group, axis=1), scores, -np.inf)
        order = _rank_descending(candidates)
        sorted_candidates = np.take_along_axis(candidates, order, axis=-1)
        expert_tie = _near_tie(sorted_candidates, k, check_order=True)
        return Routing(order[:, :k], group_tie | expert_tie)

    raise ValueError(f"unknown routing mode {mode!r}, expected one of {ROUTING_MODES}")


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = np.maximum(np.abs(a), np.abs(b))
    return bool((np.abs(a - b) <= NEAR_TIE_RELATIVE_GAP * scale).all())


def _ordered_within_tie_gap(values: np.ndarray) -> bool:
    """Check that values descend, allowing a rise up to the near-tie gap."""
    return bool((values[1:] <= values[:-1] * (1.0 + NEAR_TIE_RELATIVE_GAP)).all())


def _candidate_masks(config: LayerConfig, scores_row: np.ndarray, mode: str) -> list[np.ndarray]:
    """Return the expert masks a top-K selection may draw from under ``mode``.

    For group-limited routing every set of kept groups that is valid within
    the near-tie gap gives one mask. The other modes have one mask.
    """
    if mode == "top-k":
        return [np.ones(config.num_experts, dtype=bool)]
    group_scores = scores_row.reshape(config.num_groups, config.experts_per_group).max(axis=1)
    threshold = np.sort(group_scores)[::-1][config.topk_group - 1]
    margin = NEAR_TIE_RELATIVE_GAP * threshold
    certain = np.flatnonzero(group_scores > threshold + margin)
    ambiguous = np.flatnonzero(np.abs(group_scores - threshold) <= margin)
    masks = []
    for extra in itertools.combinations(ambiguous, config.topk_group - len(certain)):
        kept_groups = np.zeros(config.num_groups, dtype=bool)
        kept_groups[certain] = True
        kept_groups[list(extra)] = True
        masks.append(np.repeat(kept_groups, config.experts_per_group))
    return masks


def near_tie_choice_problems(
    config: LayerConfig, scores_row: np.ndarray, expert_ids: np.ndarray, mode: str
) -> list[str]:
    """Check another implementation's choice for one token against the float64 scores [N].

    A choice is accepted when it satisfies the routing mode's structure and its
    chosen scores equal the best possible ones within the near-tie gap, so
    candidates that differ by less than the gap may be exchanged. Returns the
    problems found, empty when the choice is acceptable.
    """
    ids = np.asarray(expert_ids, dtype=np.int64)
    k = config.top_k
    if ids.shape != (k,) or len(set(ids.tolist())) != k or ids.min() < 0 or ids.max() >= config.num_experts:
        return [f"expert ids {ids.tolist()} are not {k} distinct experts in 0..{config.num_experts}"]
    chosen = scores_row[ids]

    if mode == "moge":
        problems = []
        per_group = config.top_k_per_group
        for group in range(config.num_groups):
            slot_ids = ids[group * per_group : (group + 1) * per_group]
            if (slot_ids // config.experts_per_group != group).any():
                problems.append(f"slots of group {group} hold experts {slot_ids.tolist()} from other groups")
                continue
            slot_scores = scores_row[slot_ids]
            group_scores = scores_row[group * config.experts_per_group : (group + 1) * config.experts_per_group]
            best = np.sort(group_scores)[::-1][:per_group]
            if not _ordered_within_tie_gap(slot_scores):
                problems.append(f"group {group}: experts {slot_ids.tolist()} are not in descending score order")
            if not _close(np.sort(slot_scores)[::-1], best):
                problems.append(f"group {group}: experts {slot_ids.tolist()} are not the group's best {per_group}")
        return problems

    if not _ordered_within_tie_gap(chosen):
        return [f"experts {ids.tolist()} are not in descending score order"]
    for mask in _candidate_masks(config, scores_row, mode):
        if not mask[ids].all():
            continue
        best = np.sort(scores_row[mask])[::-1][:k]
        if _close(np.sort(chosen)[::-1], best):
            return []
    return [f"experts {ids.tolist()} are not a valid {mode} choice within the near-tie gap"]


def routing_weights(weights: LayerWeights, scores: np.ndarray, expert_ids: np.ndarray, renormalize: bool) -> np.ndarray:
    """Return the weight [T, K] of every chosen expert."""
    chosen = np.take_along_axis(scores, expert_ids, axis=1)
    if renormalize:
        chosen = chosen / chosen.sum(axis=1, keepdims=True)
    return chosen * weights.router_scale[expert_ids]


def group_assignments(config: LayerConfig, expert_ids: np.ndarray) -> np.ndarray:
    """Count the (token, expert) pairs per group."""
    groups = (expert_ids // config.experts_per_group).reshape(-1)
    return np.bincount(groups, minlength=config.num_groups).astype(np.int64)


def imbalance_score(counts: np.ndarray, tokens: int) -> float:
    """Return (max - min) of the group counts divided by the token count, or 0 for no tokens."""
    if tokens == 0:
        return 0.0
    return float(counts.max() - counts.min()) / tokens


# ---------------------------------------------------------------------------
# Forward pass


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def gated_mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Compute down(silu(gate(x)) * up(x)) for rows x [T, H] with weights stored [out, in]."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def layer_output(
    weights: LayerWeights, hidden: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray
) -> np.ndarray:
    """Compute the layer output [T, H] for given routing, batching the tokens of each expert."""
    output = gated_mlp(hidden, weights.shared_gate, weights.shared_up, weights.shared_down)
    for expert in np.unique(expert_ids):
        tokens, slots = np.nonzero(expert_ids == expert)
        expert_out = gated_mlp(
            hidden[tokens], weights.expert_gate[expert], weights.expert_up[expert], weights.expert_down[expert]
        )
        # A token chooses each expert at most once, so the scatter-add has no
        # repeated indices.
        output[tokens] += expert_weights[tokens, slots, None] * expert_out
    return output


@dataclass(frozen=True)
class LayerResult:
    """Everything the reference computes for one forward pass."""

    scores: np.ndarray  # [T, N]
    expert_ids: np.ndarray  # [T, K]
    near_tie: np.ndarray  # [T]
    expert_weights: np.ndarray  # [T, K]
    output: np.ndarray  # [T, H]
    group_assignments: np.ndarray  # [M]
    imbalance_score: float


def forward(
    config: LayerConfig,
    weights: LayerWeights,
    hidden: np.ndarray,
    mode: str,
    renormalize: bool,
    expert_ids_override: dict[int, np.ndarray] | None = None,
) -> LayerResult:
    """Run one layer in float64.

    ``expert_ids_override`` maps token index to the expert ids to use in place
    of the reference's own choice. It is meant for near-tie tokens, where
    another implementation's choice is as valid as the reference's.
    """
    hidden = np.asarray(hidden, dtype=np.float64)
    scores = router_scores(weights, hidden)
    routing = route(config, scores, mode)
    expert_ids = routing.expert_ids.copy()
    for token, ids in (expert_ids_override or {}).items():
        expert_ids[token] = ids
    expert_weights = routing_weights(weights, scores, expert_ids, renormalize)
    counts = group_assignments(config, expert_ids)
    return LayerResult(
        scores=scores,
        expert_ids=expert_ids,
        near_tie=routing.near_tie,
        expert_weights=expert_weights,
        output=layer_output(weights, hidden, expert_ids, expert_weights),
        group_assignments=counts,
        imbalance_score=imbalance_score(counts, hidden.shape[0]),
    )

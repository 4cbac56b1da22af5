"""Compare `moge-ckpt run` against the float64 numpy reference on fresh random inputs.

Tolerances on `output`, as normwise error max|y - ref| / max|ref|:

* F32 input: 1e-5. The Rust path computes in f32 and writes f32.
* F16 input: 2e-3. This adds the rounding of the output to f16 (2^-11 relative).
* BF16 input: 1e-2. This adds the rounding of the output to bf16 (2^-8 relative).

The reference always computes on the dequantized input, so input rounding is
not part of these errors. `expert_ids` and `group_assignments` must match
exactly and `expert_weights` within rtol 1e-5, except for tokens whose float64
routing has a near tie (see moge_reference.NEAR_TIE_RELATIVE_GAP). For such a
token the test checks that Rust's choice is valid within the gap and then
computes the reference with Rust's ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import moge_reference as ref
from conftest import CHECKPOINT_SPECS, GeneratedCheckpoint, MogeCkpt, RunResult

OUTPUT_TOLERANCE = {"F32": 1e-5, "F16": 2e-3, "BF16": 1e-2}
WEIGHT_RTOL = 1e-5
INPUT_DTYPES = ("BF16", "F16", "F32")

# (checkpoint name, layer) pairs the reference comparison runs on.
LAYER_CASES = [("default", 0), ("grouped-skewed", 0), ("single-file", 1)]


def draw_hidden_states(seed: int, tokens: int, hidden_size: int) -> np.ndarray:
    """Draw float32 hidden states with unit variance, the scale of normalized transformer activations."""
    return np.random.default_rng(seed).standard_normal((tokens, hidden_size)).astype(np.float32)


def write_input(directory: Path, values: np.ndarray, dtype: str) -> tuple[Path, np.ndarray]:
    """Write ``values`` as `hidden_states` in ``dtype`` and return the path and the stored values in float64."""
    path = directory / f"hidden-{dtype}-{len(values)}.safetensors"
    ref.write_safetensors(path, {"hidden_states": (dtype, values)})
    return path, ref.quantize(values, dtype)


def normwise_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def describe_token(result: ref.LayerResult, rust_ids: np.ndarray, token: int) -> str:
    ids = result.expert_ids[token]
    return (
        f"token {token}: rust ids {rust_ids[token].tolist()}, reference ids {ids.tolist()}, "
        f"reference scores of rust ids {result.scores[token, rust_ids[token]].tolist()}, "
        f"reference scores of reference ids {result.scores[token, ids].tolist()}"
    )


def check_against_reference(
    checkpoint: GeneratedCheckpoint,
    layer: int,
    hidden: np.ndarray,
    run: RunResult,
    mode: str,
    renormalize: bool,
    input_dtype: str,
    context: str,
) -> ref.LayerResult:
    """Assert that one Rust run matches the reference and return the reference result.

    ``context`` names the case and its seed and starts every failure message.
    """
    config = checkpoint.reference.config
    weights = checkpoint.layer_weights(layer)
    tokens = hidden.shape[0]
    expected = ref.forward(config, weights, hidden, mode, renormalize)

    assert run.dtypes == {
        "output": input_dtype,
        "expert_ids": "I32",
        "expert_weights": "F32",
        "group_assignments": "I64",
    }, f"{context}: output tensor dtypes"
    rust_ids = run.tensors["expert_ids"].astype(np.int64)
    assert run.tensors["output"].shape == (tokens, config.hidden_size), f"{context}: output shape"
    assert rust_ids.shape == (tokens, config.top_k), f"{context}: expert_ids shape"
    assert run.tensors["expert_weights"].shape == (tokens, config.top_k), f"{context}: expert_weights shape"
    assert run.tensors["group_assignments"].shape == (config.num_groups,), f"{context}: group_assignments shape"

    # Tokens with a near tie in the float64 routing may legitimately differ.
    # Check Rust's choice there and take it for the reference.
    differing = (rust_ids != expected.expert_ids).any(axis=1)
    unexplained = np.flatnonzero(differing & ~expected.near_tie)
    assert unexplained.size == 0, (
        f"{context}: expert_ids differ on {unexplained.size} token(s) without a near tie. First "
        + describe_token(expected, rust_ids, int(unexplained[0]))
    )
    overrides = {}
    for token in np.flatnonzero(differing):
        problems = ref.near_tie_choice_problems(config, expected.scores[token], rust_ids[token], mode)
        assert not problems, (
            f"{context}: invalid choice on a near-tie token {problems}. "
            + describe_token(expected, rust_ids, int(token))
        )
        overrides[int(token)] = rust_ids[token]
    if overrides:
        print(f"{context}: accepted Rust's choice on near-tie tokens {sorted(overrides)}")
        expected = ref.forward(config, weights, hidden, mode, renormalize, overrides)

    np.testing.assert_allclose(
        run.tensors["expert_weights"],
        expected.expert_weights,
        rtol=WEIGHT_RTOL,
        atol=0,
        err_msg=f"{context}: expert_weights",
    )
    assert run.tensors["group_assignments"].tolist() == expected.group_assignments.tolist(), (
        f"{context}: group_assignments tensor"
    )
    assert run.summary["group_assignments"] == expected.group_assignments.tolist(), (
        f"{context}: summary group_assignments"
    )
    assert run.summary["imbalance_score"] == pytest.approx(expected.imbalance_score, abs=1e-12), (
        f"{context}: summary imbalance_score"
    )
    assert run.summary["tokens"] == tokens, f"{context}: summary tokens"

    if tokens > 0:
        error = normwise_error(run.tensors["output"].astype(np.float64), expected.output)
        assert error <= OUTPUT_TOLERANCE[input_dtype], (
            f"{context}: output normwise error {error:.3e} exceeds {OUTPUT_TOLERANCE[input_dtype]:.0e}"
        )
    return expected


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("mode", ref.ROUTING_MODES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize(("checkpoint_name", "layer"), LAYER_CASES)
def test_layer_matches_reference(
    moge_ckpt: MogeCkpt,
    checkpoints: dict[str, GeneratedCheckpoint],
    tmp_path: Path,
    seed: int,
    checkpoint_name: str,
    layer: int,
    tokens: int,
    mode: str,
    input_dtype: str,
):
    checkpoint = checkpoints[checkpoint_name]
    config = checkpoint.reference.config
    context = (
        f"seed={seed} checkpoint={checkpoint_name} layer={layer} routing={mode} dtype={input_dtype} T={tokens}"
    )
    input_path, hidden = write_input(tmp_path, draw_hidden_states(seed, tokens, config.hidden_size), input_dtype)

    run = moge_ckpt.run(checkpoint.directory, input_path, "--layer", str(layer), "--routing", mode)
    check_against_reference(checkpoint, layer, hidden, run, mode, config.norm_topk_prob, input_dtype, context)

    if mode == "moge":
        per_group = tokens * config.top_k_per_group
        assert run.summary["group_assignments"] == [per_group] * config.num_groups, (
            f"{context}: MoGE must give every group T*K' = {per_group} assignments"
        )
        assert run.summary["imbalance_score"] == 0, f"{context}: MoGE imbalance_score must be 0"
    if mode == "top-k" and checkpoint_name == "grouped-skewed" and tokens == 300:
        assert run.summary["imbalance_score"] > 0, f"{context}: skewed top-k routing should be imbalanced"


@pytest.mark.parametrize("mode", ref.ROUTING_MODES)
@pytest.mark.parametrize("checkpoint_name", ["default", "grouped-skewed"])
def test_renormalized_weights_match_reference(
    moge_ckpt: MogeCkpt,
    checkpoints: dict[str, GeneratedCheckpoint],
    tmp_path: Path,
    seed: int,
    checkpoint_name: str,
    mode: str,
):
    checkpoint = checkpoints[checkpoint_name]
    config = checkpoint.reference.config
    assert not config.norm_topk_prob, "generated checkpoints are expected to default to no renormalization"
    context = f"seed={seed} checkpoint={checkpoint_name} layer=0 routing={mode} renormalize=true dtype=F32 T=7"
    input_path, hidden = write_input(tmp_path, draw_hidden_states(seed, 7, config.hidden_size), "F32")

    run = moge_ckpt.run(checkpoint.directory, input_path, "--routing", mode, "--renormalize", "true")
    expected = check_against_reference(checkpoint, 0, hidden, run, mode, True, "F32", context)

    raw_scores = np.take_along_axis(expected.scores, expected.expert_ids, axis=1)
    unscaled = run.tensors["expert_weights"] / checkpoint.layer_weights(0).router_scale[expected.expert_ids]
    np.testing.assert_allclose(
        unscaled.sum(axis=1),
        np.ones(7),
        rtol=WEIGHT_RTOL,
        err_msg=f"{context}: renormalized weights divided by router_scale must sum to 1 "
        f"(sums of the chosen raw scores: {raw_scores.sum(axis=1).tolist()})",
    )


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES)
@pytest.mark.parametrize("mode", ref.ROUTING_MODES)
def test_zero_tokens(
    moge_ckpt: MogeCkpt,
    checkpoints: dict[str, GeneratedCheckpoint],
    tmp_path: Path,
    mode: str,
    input_dtype: str,
):
    checkpoint = checkpoints["default"]
    config = checkpoint.reference.config
    context = f"checkpoint=default layer=0 routing={mode} dtype={input_dtype} T=0"
    input_path, hidden = write_input(tmp_path, np.zeros((0, config.hidden_size), np.float32), input_dtype)

    run = moge_ckpt.run(checkpoint.directory, input_path, "--routing", mode)
    check_against_reference(checkpoint, 0, hidden, run, mode, False, input_dtype, context)

    assert run.summary["group_assignments"] == [0] * config.num_groups, f"{context}: group_assignments"
    assert run.summary["imbalance_score"] == 0, f"{context}: imbalance_score"


# Small enough for the portable kernel, which is much slower than the detected
# one. A separate test covers one large batch.
BITWISE_TOKENS = 33
LARGE_BATCH_TOKENS = 300


def assert_bitwise_equal(first: RunResult, second: RunResult, context: str) -> None:
    assert first.dtypes == second.dtypes, f"{context}: dtypes differ"
    for name in first.tensors:
        a, b = first.tensors[name], second.tensors[name]
        assert a.shape == b.shape, f"{context}: {name} shapes differ"
        differing = int((a.view(np.uint8) != b.view(np.uint8)).sum()) if a.size else 0
        assert differing == 0, f"{context}: {name} differs in {differing} byte(s)"


@pytest.mark.parametrize("input_dtype", INPUT_DTYPES)
@pytest.mark.parametrize(
    "variant_args",
    [("--portable",), ("--weights", "f32"), ("--weights", "f32", "--portable")],
    ids=["portable", "weights-f32", "weights-f32-portable"],
)
def test_kernel_variants_bitwise_identical(
    moge_ckpt: MogeCkpt,
    checkpoints: dict[str, GeneratedCheckpoint],
    tmp_path: Path,
    seed: int,
    variant_args: tuple[str, ...],
    input_dtype: str,
):
    checkpoint = checkpoints["grouped-skewed"]
    context = f"seed={seed} checkpoint=grouped-skewed dtype={input_dtype} T={BITWISE_TOKENS} variant={variant_args}"
    values = draw_hidden_states(seed, BITWISE_TOKENS, checkpoint.reference.config.hidden_size)
    input_path, _ = write_input(tmp_path, values, input_dtype)

    for mode in ("moge", "top-k"):
        baseline = moge_ckpt.run(checkpoint.directory, input_path, "--routing", mode)
        variant = moge_ckpt.run(checkpoint.directory, input_path, "--routing", mode, *variant_args)
        kernels = f"kernels {baseline.summary['kernel']} and {variant.summary['kernel']}"
        assert_bitwise_equal(baseline, variant, f"{context} routing={mode} {kernels}")


def test_portable_kernel_bitwise_identical_large_batch(
    moge_ckpt: MogeCkpt, checkpoints: dict[str, GeneratedCheckpoint], tmp_path: Path, seed: int
):
    checkpoint = checkpoints["default"]
    context = f"seed={seed} checkpoint=default dtype=F32 T={LARGE_BATCH_TOKENS} routing=group-limited"
    values = draw_hidden_states(seed, LARGE_BATCH_TOKENS, checkpoint.reference.config.hidden_size)
    input_path, _ = write_input(tmp_path, values, "F32")

    baseline = moge_ckpt.run(checkpoint.directory, input_path, "--routing", "group-limited")
    portable = moge_ckpt.run(checkpoint.directory, input_path, "--routing", "group-limited", "--portable")

    kernels = f"kernels {baseline.summary['kernel']} and {portable.summary['kernel']}"
    assert_bitwise_equal(baseline, portable, f"{context} {kernels}")


# ---------------------------------------------------------------------------
# Checkpoint layout


EXPECTED_CONFIG = {
    "hidden_size": 512,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 512,
    "num_hidden_layers": 2,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "norm_topk_prob": False,
}


def safetensors_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


@pytest.mark.parametrize("checkpoint_name", list(CHECKPOINT_SPECS))
def test_checkpoint_layout(checkpoints: dict[str, GeneratedCheckpoint], checkpoint_name: str):
    checkpoint = checkpoints[checkpoint_name]
    directory = checkpoint.directory
    raw_config = json.loads((directory / "config.json").read_text())

    for key, value in EXPECTED_CONFIG.items():
        assert key in raw_config, f"{checkpoint_name}: config.json has no {key!r}"
        assert raw_config[key] == value, f"{checkpoint_name}: config.json {key}"
    if "--groups" in checkpoint.generate_args:
        assert raw_config.get("n_group") == 4, f"{checkpoint_name}: config.json n_group"
    else:
        assert "n_group" not in raw_config, f"{checkpoint_name}: config.json has n_group without --groups"

    # Collect every tensor entry of every file, checking that the entries tile
    # the data section exactly.
    entries = {}
    for path in safetensors_files(directory):
        header, data_start = ref.read_safetensors_header(path)
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            assert name not in entries, f"{checkpoint_name}: tensor {name} appears in two files"
            entries[name] = (path.name, entry)
            spans.append(tuple(entry["data_offsets"]))
        spans.sort()
        assert spans[0][0] == 0, f"{checkpoint_name}: {path.name} data does not start at offset 0"
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            assert end == begin, f"{checkpoint_name}: {path.name} has a gap or overlap at data offset {end}"
        assert data_start + spans[-1][1] == path.stat().st_size, f"{checkpoint_name}: {path.name} size"

    expected_shapes = {}
    for layer in checkpoint.layers:
        expected_shapes |= ref.layer_tensor_shapes(checkpoint.reference.config, layer)
    assert sorted(entries) == sorted(expected_shapes), f"{checkpoint_name}: tensor names"
    for name, (file_name, entry) in entries.items():
        assert entry["shape"] == expected_shapes[name], f"{checkpoint_name}: {name} shape in {file_name}"
        assert entry["dtype"] == "BF16", f"{checkpoint_name}: {name} dtype in {file_name}"

    index_path = directory / "model.safetensors.index.json"
    if "--single-file" in checkpoint.generate_args:
        assert [path.name for path in safetensors_files(directory)] == ["model.safetensors"]
        assert not index_path.exists(), f"{checkpoint_name}: single-file checkpoint has an index"
        return

    layer_count = len(checkpoint.layers)
    expected_files = [f"model-{i:05d}-of-{layer_count:05d}.safetensors" for i in range(1, layer_count + 1)]
    assert [path.name for path in safetensors_files(directory)] == expected_files, f"{checkpoint_name}: shard names"
    index = json.loads(index_path.read_text())
    assert index["weight_map"] == {name: file_name for name, (file_name, _) in entries.items()}, (
        f"{checkpoint_name}: weight_map does not match the shard headers"
    )
    data_bytes = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for _, entry in entries.values())
    assert index["metadata"]["total_size"] == data_bytes, f"{checkpoint_name}: index total_size"
    for file_name, layer in zip(expected_files, checkpoint.layers):
        layer_prefix = f"model.layers.{layer}."
        in_file = {name for name, (owner, _) in entries.items() if owner == file_name}
        assert all(name.startswith(layer_prefix) for name in in_file), f"{checkpoint_name}: {file_name} mixes layers"


def test_generate_is_deterministic(moge_ckpt: MogeCkpt, tmp_path: Path, seed: int):
    generator_seed = seed % 2**32
    first = moge_ckpt.generate(tmp_path / "first", "--seed", str(generator_seed))
    second = moge_ckpt.generate(tmp_path / "second", "--seed", str(generator_seed))
    other = moge_ckpt.generate(tmp_path / "other", "--seed", str(generator_seed + 1))

    shard_names = [path.name for path in safetensors_files(first)]
    assert shard_names, "the generator wrote no safetensors files"
    for name in shard_names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), (
            f"seed {generator_seed}: {name} differs between two runs with the same seed"
        )
        assert (first / name).read_bytes() != (other / name).read_bytes(), (
            f"seeds {generator_seed} and {generator_seed + 1}: {name} is identical"
        )


# ---------------------------------------------------------------------------
# Input errors


def test_run_rejects_wrong_hidden_size(
    moge_ckpt: MogeCkpt, checkpoints: dict[str, GeneratedCheckpoint], tmp_path: Path
):
    input_path = tmp_path / "narrow.safetensors"
    ref.write_safetensors(input_path, {"hidden_states": ("F32", np.ones((3, 256), np.float32))})

    process = moge_ckpt.invoke(
        "run",
        "--checkpoint",
        checkpoints["default"].directory,
        "--input",
        input_path,
        "--output",
        tmp_path / "out.safetensors",
    )

    assert process.returncode != 0, f"a [3, 256] input was accepted; stdout: {process.stdout}"
    assert "[3, 256]" in process.stderr, f"stderr does not name the input shape:\n{process.stderr}"
    assert "[T, 512]" in process.stderr, f"stderr does not name the expected shape:\n{process.stderr}"


def test_run_rejects_missing_hidden_states(
    moge_ckpt: MogeCkpt, checkpoints: dict[str, GeneratedCheckpoint], tmp_path: Path
):
    input_path = tmp_path / "misnamed.safetensors"
    ref.write_safetensors(input_path, {"hidden": ("F32", np.ones((3, 512), np.float32))})

    process = moge_ckpt.invoke(
        "run",
        "--checkpoint",
        checkpoints["default"].directory,
        "--input",
        input_path,
        "--output",
        tmp_path / "out.safetensors",
    )

    assert process.returncode != 0, f"an input without hidden_states was accepted; stdout: {process.stdout}"
    assert "hidden_states" in process.stderr, f"stderr does not name the missing tensor:\n{process.stderr}"


# ---------------------------------------------------------------------------
# Self-checks of the reference, because the comparisons above are only as right as the reference


def test_bf16_rounding_is_nearest_even():
    values = np.array(
        [
            1.0,
            1.0 + 2.0**-8,  # halfway between 0x3F80 and 0x3F81, so it rounds to the even 0x3F80
            1.0 + 3 * 2.0**-8,  # halfway between 0x3F81 and 0x3F82, so it rounds to the even 0x3F82
            1.0 + 2.0**-8 + 2.0**-20,  # above halfway, so it rounds up to 0x3F81
            -2.5,
            0.0,
        ],
        dtype=np.float32,
    )

    bits = ref.float32_to_bf16_bits(values)

    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x0000]
    assert ref.bf16_bits_to_float32(bits).tolist() == [1.0, 1.0, 1.0 + 2.0**-6, 1.0 + 2.0**-7, -2.5, 0.0]


def test_safetensors_round_trip(tmp_path: Path, seed: int):
    values = np.random.default_rng(seed).standard_normal((3, 5)).astype(np.float32)
    tensors = {
        "bf16": ("BF16", values),
        "f16": ("F16", values),
        "f32": ("F32", values),
        "i64": ("I64", np.arange(4, dtype=np.int64)),
        "empty": ("BF16", np.zeros((0, 5), np.float32)),
    }
    path = tmp_path / "round-trip.safetensors"

    ref.write_safetensors(path, tensors)
    read = ref.read_safetensors(path)

    for name in ("bf16", "f16", "f32"):
        dtype = tensors[name][0]
        np.testing.assert_array_equal(
            read[name].astype(np.float64), ref.quantize(values, dtype), err_msg=f"seed={seed} {name}"
        )
    assert read["i64"].tolist() == [0, 1, 2, 3]
    assert read["empty"].shape == (0, 5)


TIE_CONFIG = ref.LayerConfig(
    hidden_size=4,
    num_experts=8,
    top_k=4,
    intermediate_size=2,
    shared_intermediate_size=2,
    num_groups=2,
    topk_group=1,
    norm_topk_prob=False,
)


def test_reference_ties_go_to_lower_index():
    # Experts 1, 2 and 6 tie. Group 0 contains experts 0..3, group 1 contains 4..7.
    scores = np.array([[0.05, 0.2, 0.2, 0.05, 0.1, 0.1, 0.2, 0.1]])

    top_k = ref.route(TIE_CONFIG, scores, "top-k")
    moge = ref.route(TIE_CONFIG, scores, "moge")
    limited = ref.route(TIE_CONFIG, scores, "group-limited")

    assert top_k.expert_ids.tolist() == [[1, 2, 6, 4]]
    assert moge.expert_ids.tolist() == [[1, 2, 6, 4]]
    # Both groups have max score 0.2, so the lower group 0 is kept.
    assert limited.expert_ids.tolist() == [[1, 2, 0, 3]]
    assert top_k.near_tie.tolist() == [True]
    assert moge.near_tie.tolist() == [True]
    assert limited.near_tie.tolist() == [True]


def test_reference_without_ties_flags_none():
    scores = np.array([[0.01, 0.3, 0.2, 0.02, 0.12, 0.11, 0.19, 0.05]])

    for mode in ref.ROUTING_MODES:
        assert ref.route(TIE_CONFIG, scores, mode).near_tie.tolist() == [False], mode


def test_near_tie_choice_check():
    scores = np.array([0.05, 0.2, 0.2 * (1 - 1e-8), 0.05, 0.1, 0.1, 0.2, 0.1])

    # Experts 1, 2 and 6 are interchangeable within the gap, expert 0 is not.
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([1, 6, 2, 4]), "top-k") == []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([6, 1, 2, 5]), "top-k") == []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([1, 2, 6, 0]), "top-k") != []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([1, 4, 2, 6]), "top-k") != []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([2, 1, 6, 4]), "moge") == []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([6, 4, 1, 2]), "moge") != []
    # Groups 0 and 1 tie on their max score, so either may be kept.
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([1, 2, 0, 3]), "group-limited") == []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([6, 4, 5, 7]), "group-limited") == []
    assert ref.near_tie_choice_problems(TIE_CONFIG, scores, np.array([1, 2, 6, 4]), "group-limited") != []


def test_reference_batching_matches_per_token_loop(checkpoints: dict[str, GeneratedCheckpoint], seed: int):
    checkpoint = checkpoints["grouped-skewed"]
    config = checkpoint.reference.config
    weights = checkpoint.layer_weights(0)
    hidden = draw_hidden_states(seed, 5, config.hidden_size).astype(np.float64)

    for mode in ref.ROUTING_MODES:
        result = ref.forward(config, weights, hidden, mode, renormalize=True)
        for token, x in enumerate(hidden):
            expected = ref.gated_mlp(x[None], weights.shared_gate, weights.shared_up, weights.shared_down)[0]
            chosen = result.scores[token, result.expert_ids[token]]
            for slot, expert in enumerate(result.expert_ids[token]):
                weight = chosen[slot] / chosen.sum() * weights.router_scale[expert]
                gate = weights.expert_gate[expert] @ x
                up = weights.expert_up[expert] @ x
                expected = expected + weight * (weights.expert_down[expert] @ (gate / (1 + np.exp(-gate)) * up))
            np.testing.assert_allclose(
                result.output[token], expected, rtol=1e-12, atol=1e-14, err_msg=f"seed={seed} {mode}"
            )

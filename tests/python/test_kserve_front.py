"""The gateway's KServe v2 API: gRPC through NVIDIA's tritonclient SDK, and HTTP/JSON as curl sends it.

The deployment runs as separate processes on a generated checkpoint, joined
by real gRPC on loopback. Outputs are compared with the float64 reference,
with the tolerances of test_layer_reference.py.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import moge_reference as ref
from conftest import REPO_ROOT, GeneratedCheckpoint
from stack import Stack

OUTPUT_TOLERANCE = {"FP32": 1e-5, "FP16": 2e-3, "BF16": 1e-2}
NUMPY_DTYPE = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}
REFERENCE_DTYPE = {"FP32": "F32", "FP16": "F16", "BF16": "BF16"}


class Gateway(Stack):
    """The deployment as separate processes: router, eight expert groups
    (group 0 with two replicas), the shared expert and the gateway."""

    def __init__(self, checkpoint: Path):
        super().__init__(checkpoint, groups=8, replicas={0: 2})


@pytest.fixture(scope="module")
def gateway(checkpoints: dict[str, GeneratedCheckpoint]):
    server = Gateway(checkpoints["default"].directory)
    client = grpcclient.InferenceServerClient(server.url)
    deadline = time.monotonic() + 10
    while not client.is_server_ready():
        assert time.monotonic() < deadline, "the gateway did not turn ready within 10 s"
        time.sleep(0.05)
    yield server
    assert server.stop() == 0, "the gateway did not exit cleanly on SIGTERM"


def infer(client, values: np.ndarray, datatype: str, layer: int, outputs=("output", "expert_ids")):
    tensor = grpcclient.InferInput("hidden_states", list(values.shape), datatype)
    tensor.set_data_from_numpy(values.astype(NUMPY_DTYPE[datatype]))
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
    return client.infer("moge", [tensor], outputs=requested, parameters={"layer": layer})


def test_metadata_and_readiness(gateway: Gateway):
    client = grpcclient.InferenceServerClient(gateway.url)

    assert client.is_server_live()
    assert client.is_model_ready("moge")
    metadata = client.get_model_metadata("moge")
    assert metadata.name == "moge"
    assert [tensor.name for tensor in metadata.inputs] == ["hidden_states"]
    assert list(metadata.inputs[0].shape) == [-1, 512]
    assert [tensor.name for tensor in metadata.outputs] == ["output", "expert_ids", "expert_weights"]
    assert client.get_server_metadata().name == "moge-serve"


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
@pytest.mark.parametrize("tokens", [1, 300])
def test_infer_matches_float64_reference(
    gateway: Gateway, checkpoints: dict[str, GeneratedCheckpoint], seed: int, datatype: str, tokens: int
):
    client = grpcclient.InferenceServerClient(gateway.url)
    checkpoint = checkpoints["default"]
    values = np.random.default_rng(seed).standard_normal((tokens, 512)).astype(np.float32)
    sent = values.astype(NUMPY_DTYPE[datatype]).astype(np.float64)

    result = infer(client, values, datatype, layer=1)

    output = result.as_numpy("output").astype(np.float64)
    ids = result.as_numpy("expert_ids")
    config = checkpoint.reference.config
    overrides = {}
    expected = ref.forward(config, checkpoint.layer_weights(1), sent, "moge", False)
    for token in np.flatnonzero(expected.near_tie):
        overrides[int(token)] = ids[token]
    if overrides:
        expected = ref.forward(config, checkpoint.layer_weights(1), sent, "moge", False, overrides)
    assert output.shape == (tokens, 512)
    assert np.array_equal(ids, expected.expert_ids), f"seed {seed}: expert ids differ"
    error = np.abs(output - expected.output).max() / np.abs(expected.output).max()
    assert error <= OUTPUT_TOLERANCE[datatype], f"seed {seed}: normwise error {error:.2e} for {datatype}"


def test_concurrent_clients_get_their_own_rows(gateway: Gateway, checkpoints: dict[str, GeneratedCheckpoint], seed: int):
    checkpoint = checkpoints["default"]
    config = checkpoint.reference.config
    weights = checkpoint.layer_weights(0)
    rng = np.random.default_rng(seed)
    # Each client's rows carry its own offset, so a row returned to the wrong
    # client fails the comparison with that client's reference.
    batches = [
        (rng.standard_normal((int(rng.integers(1, 40)), 512)) + client * 0.5).astype(np.float32) for client in range(12)
    ]

    def call(values: np.ndarray) -> np.ndarray:
        client = grpcclient.InferenceServerClient(gateway.url)
        return infer(client, values, "FP32", layer=0, outputs=("output",)).as_numpy("output")

    with ThreadPoolExecutor(max_workers=12) as pool:
        outputs = list(pool.map(call, batches))

    for index, (values, output) in enumerate(zip(batches, outputs)):
        expected = ref.forward(config, weights, values.astype(np.float64), "moge", False)
        error = np.abs(output - expected.output).max() / np.abs(expected.output).max()
        assert error <= 1e-5, f"seed {seed}: client {index} got rows that are not its own (error {error:.2e})"


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ("model", "StatusCode.NOT_FOUND", "is not served"),
        ("width", "StatusCode.INVALID_ARGUMENT", "expected [T, 512]"),
        ("layer", "StatusCode.INVALID_ARGUMENT", "layer: 9 is not hosted"),
        ("nan", "StatusCode.INVALID_ARGUMENT", "expected finite values"),
    ],
)
def test_bad_request_status_and_message(gateway: Gateway, change: str, code: str, message: str):
    client = grpcclient.InferenceServerClient(gateway.url)
    width = 256 if change == "width" else 512
    values = np.ones((2, width), np.float32)
    if change == "nan":
        values[1, 3] = np.nan
    tensor = grpcclient.InferInput("hidden_states", [2, width], "FP32")
    tensor.set_data_from_numpy(values)
    model = "other" if change == "model" else "moge"
    layer = 9 if change == "layer" else 0

    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [tensor], parameters={"layer": layer})

    assert raised.value.status() == code
    assert message in raised.value.message()


def http(gateway: Gateway, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Send one HTTP request as curl would and return the status and the JSON body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(gateway.http_url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_http_health_and_metadata(gateway: Gateway):
    assert http(gateway, "GET", "/v2/health/live") == (200, {"live": True})
    assert http(gateway, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert http(gateway, "GET", "/v2/models/moge/ready") == (200, {"ready": True})
    status, metadata = http(gateway, "GET", "/v2/models/moge")
    assert status == 200
    assert metadata["inputs"][0] == {"name": "hidden_states", "datatype": "FP32", "shape": [-1, 512]}
    status, body = http(gateway, "GET", "/v2/models/other")
    assert status == 404
    assert "not served" in body["error"]


@pytest.mark.parametrize("datatype", ["FP32", "FP16"])
def test_http_infer_matches_float64_reference(
    gateway: Gateway, checkpoints: dict[str, GeneratedCheckpoint], seed: int, datatype: str
):
    checkpoint = checkpoints["default"]
    values = np.random.default_rng(seed).standard_normal((3, 512)).astype(NUMPY_DTYPE[datatype])
    body = {
        "id": "curl-1",
        "parameters": {"layer": 0},
        "inputs": [{"name": "hidden_states", "shape": [3, 512], "datatype": datatype, "data": values.tolist()}],
        "outputs": [{"name": "output"}, {"name": "expert_weights"}],
    }

    status, reply = http(gateway, "POST", "/v2/models/moge/infer", body)

    assert status == 200, reply
    assert reply["id"] == "curl-1"
    output = reply["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", datatype, [3, 512])
    expected = ref.forward(checkpoint.reference.config, checkpoint.layer_weights(0), values.astype(np.float64), "moge", False)
    actual = np.array(output["data"], dtype=np.float64).reshape(3, 512)
    error = np.abs(actual - expected.output).max() / np.abs(expected.output).max()
    assert error <= OUTPUT_TOLERANCE[datatype], f"seed {seed}: normwise error {error:.2e}"
    assert reply["outputs"][1]["shape"] == [3, 8]


def test_http_rejects_bf16_json_with_pointer_to_grpc(gateway: Gateway):
    body = {"inputs": [{"name": "hidden_states", "shape": [1, 512], "datatype": "BF16", "data": [0.0] * 512}]}

    status, reply = http(gateway, "POST", "/v2/models/moge/infer", body)

    assert status == 400
    assert "BF16 has no JSON representation" in reply["error"]
    assert "gRPC" in reply["error"]


def test_http_rejects_wrong_width_by_field(gateway: Gateway):
    body = {"inputs": [{"name": "hidden_states", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}

    status, reply = http(gateway, "POST", "/v2/models/moge/infer", body)

    assert status == 400
    assert "expected [T, 512]" in reply["error"]


TRACE = REPO_ROOT / "data" / "azure-llm-inference-2023" / "conv.csv"
TRACE_REQUESTS = 200
# The first 200 requests span about 37 s and up to ~4,000 prompt tokens. To
# fit 2 cores, the replay compresses time 20x and divides token counts by 16,
# with at most 3 decode calls per request.
TIME_SCALE = 1 / 20
TOKEN_DIVISOR = 16
MAX_DECODE_CALLS = 3
SAMPLE_EVERY = 25


def test_azure_trace_replay(gateway: Gateway, checkpoints: dict[str, GeneratedCheckpoint], seed: int):
    rows = TRACE.read_text().splitlines()[1 : TRACE_REQUESTS + 1]
    trace = []
    for row in rows:
        timestamp, context, generated = row.split(",")
        clock = timestamp.split(" ")[1]
        hours, minutes, seconds = clock.split(":")
        arrival = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        trace.append((arrival, max(1, int(context) // TOKEN_DIVISOR), min(MAX_DECODE_CALLS, int(generated))))
    start = trace[0][0]
    print(
        f"replaying {len(trace)} requests: time x{TIME_SCALE}, prompt tokens / {TOKEN_DIVISOR}, "
        f"at most {MAX_DECODE_CALLS} decode calls each"
    )
    checkpoint = checkpoints["default"]
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((tokens, 512)).astype(np.float32) for _, tokens, _ in trace]
    began = time.monotonic()

    def replay(index: int) -> tuple[int, tuple[np.ndarray, np.ndarray], int]:
        arrival, tokens, decodes = trace[index]
        delay = (arrival - start) * TIME_SCALE - (time.monotonic() - began)
        if delay > 0:
            time.sleep(delay)
        client = grpcclient.InferenceServerClient(gateway.url)
        reply = infer(client, inputs[index], "BF16", layer=index % 2, outputs=("output", "expert_ids"))
        prefill = (reply.as_numpy("output"), reply.as_numpy("expert_ids"))
        answered = 1
        for step in range(decodes):
            token = inputs[index][step % tokens : step % tokens + 1]
            decoded = infer(client, token, "BF16", layer=index % 2, outputs=("output",)).as_numpy("output")
            assert decoded.shape == (1, 512)
            answered += 1
        return index, prefill, answered

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(replay, range(len(trace))))

    expected_calls = sum(1 + decodes for _, _, decodes in trace)
    assert sum(answered for _, _, answered in results) == expected_calls
    config = checkpoint.reference.config
    for index, (output, ids), _ in results[::SAMPLE_EVERY]:
        sent = inputs[index].astype(ml_dtypes.bfloat16).astype(np.float64)
        weights = checkpoint.layer_weights(index % 2)
        expected = ref.forward(config, weights, sent, "moge", False)
        near_ties = {int(token): ids[token] for token in np.flatnonzero(expected.near_tie)}
        if near_ties:
            expected = ref.forward(config, weights, sent, "moge", False, near_ties)
        error = np.abs(output.astype(np.float64) - expected.output).max() / np.abs(expected.output).max()
        assert error <= OUTPUT_TOLERANCE["BF16"], f"seed {seed}: request {index} normwise error {error:.2e}"

"""Fixtures for testing the `moge-ckpt` binary against the float64 reference.

The binary comes from the MOGE_CKPT environment variable, or else from
<repo>/target/release/moge-ckpt (build it with
`cargo build --release -p moge-ckpt`). Every test that draws random inputs gets
its seed from os.urandom, unless MOGE_TEST_SEED is set to reproduce a failure.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread is faster here: the matrices are small, and idle OpenBLAS
# threads spin on the cores that the moge-ckpt subprocesses need. This must run
# before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import moge_reference as ref  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_VARIABLE = "MOGE_TEST_SEED"
COMMAND_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class RunResult:
    """Outcome of one `moge-ckpt run`: the output tensors and the JSON summary from stdout."""

    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    summary: dict
    output_path: Path


class MogeCkpt:
    """Runner for the `moge-ckpt` binary, invoked as a user would.

    ``check`` and the helpers built on it fail the test with stderr when the binary exits non-zero.
    """

    def __init__(self, binary: Path):
        self.binary = binary

    def invoke(self, *args: str | Path) -> subprocess.CompletedProcess:
        """Run the binary with ``args`` and return the completed process, whatever its exit status."""
        return subprocess.run(
            [str(self.binary), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )

    def check(self, *args: str | Path) -> subprocess.CompletedProcess:
        process = self.invoke(*args)
        if process.returncode != 0:
            command = " ".join([str(self.binary), *map(str, args)])
            pytest.fail(f"`{command}` exited with status {process.returncode}\nstderr:\n{process.stderr}")
        return process

    def generate(self, out: Path, *args: str | Path) -> Path:
        self.check("generate", "--preset", "small", "--out", out, *args)
        return out

    def run(self, checkpoint: Path, input_path: Path, *args: str | Path) -> RunResult:
        """Run one layer on ``input_path`` and read back the output file and the summary line."""
        output_path = input_path.with_name(f"{input_path.stem}-output-{os.urandom(4).hex()}.safetensors")
        process = self.check("run", "--checkpoint", checkpoint, "--input", input_path, "--output", output_path, *args)
        lines = [line for line in process.stdout.splitlines() if line.strip()]
        assert lines, f"`moge-ckpt run` printed no JSON summary on stdout. stderr:\n{process.stderr}"
        header, _ = ref.read_safetensors_header(output_path)
        dtypes = {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
        return RunResult(ref.read_safetensors(output_path), dtypes, json.loads(lines[-1]), output_path)


@pytest.fixture(scope="session")
def moge_ckpt() -> MogeCkpt:
    binary = Path(os.environ.get("MOGE_CKPT", REPO_ROOT / "target" / "release" / "moge-ckpt"))
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"moge-ckpt binary not found or not executable at {binary}. "
            "Build it with `cargo build --release -p moge-ckpt` or set MOGE_CKPT to its path",
            pytrace=False,
        )
    return MogeCkpt(binary)


@dataclass(frozen=True)
class GeneratedCheckpoint:
    """A checkpoint written once per session, with the arguments that produced it."""

    name: str
    directory: Path
    generate_args: tuple[str, ...]
    layers: tuple[int, ...]
    reference: ref.Checkpoint

    @functools.cache
    def layer_weights(self, layer: int) -> ref.LayerWeights:
        return self.reference.load_layer(layer)


# Name -> (extra `generate` arguments, layers the checkpoint contains).
CHECKPOINT_SPECS = {
    "default": ((), (0, 1)),
    "grouped-skewed": (("--groups", "4", "--router-skew", "2.0", "--seed", "7"), (0, 1)),
    "single-file": (("--single-file", "--layers", "1"), (1,)),
}


@pytest.fixture(scope="session")
def checkpoints(moge_ckpt: MogeCkpt, tmp_path_factory: pytest.TempPathFactory) -> dict[str, GeneratedCheckpoint]:
    generated = {}
    for name, (args, layers) in CHECKPOINT_SPECS.items():
        directory = moge_ckpt.generate(tmp_path_factory.mktemp(f"checkpoint-{name}"), *args)
        generated[name] = GeneratedCheckpoint(name, directory, args, layers, ref.Checkpoint(directory))
    return generated


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Draw the test's random seed from os.urandom, or take MOGE_TEST_SEED to reproduce a run."""
    text = os.environ.get(SEED_VARIABLE)
    value = int(text) if text else int.from_bytes(os.urandom(8), "little")
    request.node.user_properties.append(("seed", value))
    print(f"{SEED_VARIABLE}={value}")
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"reproduce with {SEED_VARIABLE}={value}"))
    return report

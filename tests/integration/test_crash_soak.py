"""CI's crash soak: a few runs killed at random points (SIGKILL), resumed, compared with an uninterrupted run."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parents[2] / "scripts" / "crash_soak.py"


def test_a_small_crash_soak_resumes_to_identical_artifacts(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--runs",
            "2",
            "--seed",
            "7",
            "--workdir",
            str(tmp_path),
            "--formats",
            "safetensors,onnx,gguf",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 runs" in done.stdout and "0 mismatches" in done.stdout and done.stdout.count("-> identical") == 2

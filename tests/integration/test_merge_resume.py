"""A merge killed with SIGKILL at several points, rerun with the same arguments, ends byte-identical."""

import os
import signal
import subprocess
import sys

import pytest

from model_export.demo.tiny import build_adapter, build_base_model
from tests.conftest import tree_digest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    base = build_base_model(root / "base", num_hidden_layers=4, hidden_size=128, max_shard_size="300KB")
    adapter = build_adapter(base, root / "adapter", target_modules=["q_proj", "down_proj", "embed_tokens"])
    return base, adapter


def run_merge(base, adapter, out, crash_at=None):
    env = {k: v for k, v in os.environ.items() if k != "MODEL_EXPORT_CRASH_AT"}
    if crash_at:
        env["MODEL_EXPORT_CRASH_AT"] = crash_at
    cli = os.path.join(os.path.dirname(sys.executable), "model-export")
    return subprocess.run(
        [
            cli,
            "merge",
            "--adapter",
            str(adapter),
            "--base",
            str(base),
            "--out",
            str(out),
            "--dtype",
            "bf16",
            "--max-shard-size",
            "200KB",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_killed_merges_resume_to_identical_output(inputs, tmp_path):
    base, adapter = inputs
    clean = run_merge(base, adapter, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    expected = tree_digest(tmp_path / "clean")
    for point in ("tensor:3", "shard:1", "tensor:17", "shard:3", "layout:1"):
        out = tmp_path / point.replace(":", "-")
        killed = run_merge(base, adapter, out, crash_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        assert not (out / "config.json").exists() or point == "layout:1"
        resumed = run_merge(base, adapter, out)
        assert resumed.returncode == 0, resumed.stderr
        if point.startswith("shard") or point == "layout:1":
            assert "Keeping model-00001-of-" in resumed.stderr
        assert tree_digest(out) == expected, point

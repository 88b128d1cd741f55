"""Fixtures the integration tests share."""

import pytest


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """The demo's Trainer run (checkpoint-10/20/30 of a real LoRA fine-tune on the shipped base), one per module."""
    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_training_run

    return build_training_run(shipped_base(), tmp_path_factory.mktemp("demo") / "qwen3-finetuned")

"""CheckpointDetector: numeric order, incomplete checkpoints skipped with a reason, the Trainer's best."""

import json
import logging
import shutil

import pytest

from model_export import CheckpointDetector, CheckpointValidationError, detect


def test_numeric_order(make_run):
    root = make_run([30, 100, 9])
    assert CheckpointDetector().detect_latest_checkpoint(root) == root / "checkpoint-100"


def test_a_directory_that_is_itself_an_adapter(adapter):
    assert CheckpointDetector().detect_latest_checkpoint(adapter) == adapter
    assert detect(adapter).candidates[0].complete


def test_final_adapter_in_the_root_wins_for_latest(make_run, adapter):
    root = make_run([10, 20])
    for f in adapter.iterdir():
        shutil.copy(f, root / f.name)
    assert detect(root).path == root


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), "Required file missing: adapter_model.safetensors"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), "the file is empty"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(
                (d / "adapter_model.safetensors").read_bytes()[:-100]
            ),
            "truncated",
        ),
        (lambda d: (d / "adapter_config.json").write_text('{"r": 8,'), "adapter_config.json is not valid JSON"),
        (lambda d: (d / "adapter_config.json").unlink(), "Required file missing: adapter_config.json"),
    ],
)
def test_incomplete_checkpoints_are_skipped_with_a_logged_reason(make_run, caplog, damage, reason):
    root = make_run([10, 20, 30])
    damage(root / "checkpoint-30")
    with caplog.at_level(logging.WARNING, logger="model_export"):
        result = detect(root)
    assert result.path == root / "checkpoint-20"
    skipped = [c for c in result.candidates if not c.complete]
    assert [c.step for c in skipped] == [30] and reason in skipped[0].reason
    assert any("Skipped" in r.message and "checkpoint-30" in r.message and reason in r.message for r in caplog.records)


def test_no_complete_checkpoint(make_run):
    root = make_run([10, 20])
    for step in (10, 20):
        (root / f"checkpoint-{step}" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointValidationError) as err:
        detect(root)
    assert err.value.code == "ME211"
    assert "checkpoint-10: Required file missing" in str(err.value) and "checkpoint-20" in str(err.value)


def test_missing_directory_gives_the_guides_text(tmp_path):
    with pytest.raises(CheckpointValidationError) as err:
        detect("./qwen3-finetuned-missing")
    assert (
        err.value.code == "ME201" and str(err.value) == "Checkpoint directory does not exist: ./qwen3-finetuned-missing"
    )


def test_directory_without_any_adapter_gives_the_guides_text(tmp_path):
    (tmp_path / "qwen3-finetuned").mkdir()
    with pytest.raises(CheckpointValidationError) as err:
        detect(tmp_path / "qwen3-finetuned")
    assert (
        err.value.code == "ME203"
        and str(err.value) == f"Can't find adapter_config.json in {tmp_path / 'qwen3-finetuned'}"
    )


def test_a_named_adapter_that_is_incomplete_raises_its_own_error(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointValidationError) as err:
        detect(adapter_copy)
    assert err.value.code == "ME202" and str(err.value) == "Required file missing: adapter_model.safetensors"


def test_best_uses_trainer_state_even_when_recorded_elsewhere(make_run):
    root = make_run([10, 20, 30], best=20)
    assert CheckpointDetector().detect_best_checkpoint(root) == root / "checkpoint-20"
    assert CheckpointDetector("best").detect(root).selected == str(root / "checkpoint-20")


def test_best_not_recorded(make_run):
    root = make_run([10, 20])
    with pytest.raises(CheckpointValidationError) as err:
        detect(root, "best")
    assert err.value.code == "ME212" and "best_model_checkpoint is empty" in str(err.value)
    assert "checkpoint_selection: latest" in err.value.hint()


def test_best_incomplete_or_missing(make_run):
    root = make_run([10, 20, 30], best=20)
    (root / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointValidationError, match="checkpoint-20 is incomplete"):
        detect(root, "best")
    state = root / "checkpoint-30" / "trainer_state.json"
    state.write_text(json.dumps({"best_model_checkpoint": "out/checkpoint-7"}))
    with pytest.raises(CheckpointValidationError, match="checkpoint-7 is not a folder of"):
        detect(root, "best")

"""``model-export demo``: works offline, on a tiny Qwen3-architecture model built and fine-tuned on the spot.

It runs every stage that exists so far (validate-config, detect, check, merge, doctor) on a real
Trainer + PEFT output tree; later stages join as the pipeline grows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import i18n
from ..checkpoint_detector import detect
from ..checkpoint_validator import validate_checkpoint
from ..config import ExportConfiguration
from ..config_validator import check_config
from ..doctor import doctor
from ..model_merger import ModelMerger
from ..monitoring import logger, timed_step
from .tiny import build_base_model, build_training_run

__all__ = ["demo"]


def demo(workdir: str | Path = "export-demo") -> dict[str, Any]:
    """Build (or reuse) the demo base model and training run under ``workdir`` and check them end to end."""
    workdir = Path(workdir)
    base, run = workdir / "base-model", workdir / "qwen3-finetuned"
    with timed_step("build"):
        if not (base / "config.json").is_file():
            logger.info(i18n.ui("demo_building", path=base))
            build_base_model(base)
        else:
            logger.info(i18n.ui("demo_reuse", path=base))
        if not (run / "checkpoint-30" / "adapter_model.safetensors").is_file():
            logger.info(i18n.ui("demo_training", path=run))
            build_training_run(base, run)
        else:
            logger.info(i18n.ui("demo_reuse", path=run))
    config = ExportConfiguration(checkpoint_path=str(run), base_model_name=str(base), output_dir=str(workdir / "export"))
    config_file = workdir / "model-export.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8")
    with timed_step("validate-config"):
        check_config(config, str(config_file))
    with timed_step("detect"):
        detection = detect(config.checkpoint_path, config.checkpoint_selection)
    with timed_step("check"):
        report = validate_checkpoint(detection.path, config.base_model_name)
    with timed_step("merge"):
        merged = ModelMerger(config).merge()
    with timed_step("doctor"):
        health = doctor(output_dir=config.output_dir)
    logger.info(i18n.ui("demo_done", checkpoint=detection.selected, base=base, config=config_file))
    return {"config": str(config_file), "detection": detection.to_dict(), "check": report.to_dict(),
            "merge": merged.to_dict(), "doctor": health.to_dict()}

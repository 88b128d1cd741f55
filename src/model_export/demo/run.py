"""``model-export demo``: the whole pipeline, offline, on a tiny model that ships in the package.

The base is a tiny pretrained Qwen3-architecture model and tokenizer (model_export/demo/base, made
by scripts/make_demo_model.py from the bundled corpus). The demo fine-tunes a real LoRA on it with
transformers' Trainer and PEFT, leaving ``qwen3-finetuned/checkpoint-10/20/30`` with the usual
Trainer files, then runs the pipeline with the default configuration into ``export-demo/``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import extras, i18n
from ..config import ExportConfiguration
from ..monitoring import logger
from ..pipeline.run import run_adapter
from .tiny import TASK_PROMPTS, build_training_run

__all__ = ["demo", "shipped_base"]


def shipped_base() -> Path:
    """The tiny pretrained base model inside the installed package."""
    return Path(str(resources.files("model_export.demo").joinpath("base")))


def demo(workdir: str | Path = ".") -> dict[str, Any]:
    """Fine-tune (or reuse) the demo LoRA under ``workdir`` and run the pipeline into ``workdir/export-demo``."""
    workdir = Path(workdir)
    base, training = shipped_base(), workdir / "qwen3-finetuned"
    if not (training / "checkpoint-30" / "adapter_model.safetensors").is_file():
        logger.info(i18n.ui("demo_training", path=training))
        build_training_run(base, training)
    else:
        logger.info(i18n.ui("demo_reuse", path=training))
    # ONNX and GGUF join when their extras are installed (make demo installs them); the demo never needs them.
    formats = ["safetensors"] + (["onnx"] if extras.is_available("onnx") and extras.is_available("onnxruntime") else [])
    formats += ["gguf"] if extras.is_available("gguf") else []
    # Verified on the requests the demo's fine-tune learned, as a user verifies on prompts of their own task.
    config = ExportConfiguration(
        checkpoint_path=str(training),
        base_model_name=str(base),
        output_dir=str(workdir / "export-demo"),
        export_formats=formats,
        test_input_samples=TASK_PROMPTS,
    )
    config_file = workdir / "export-demo.yaml"
    config_file.write_text(
        yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    result = run_adapter(config)
    logger.info(
        i18n.ui("demo_done", checkpoint=result.steps["detect"]["result"]["selected"], base=base, config=config_file)
    )
    return {"config": str(config_file), **result.to_dict()}

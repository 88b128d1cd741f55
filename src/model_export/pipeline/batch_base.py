"""What a batch makes once for all its adapters, under output_dir/base/ (batch.py calls prepare_base before any
adapter's run starts; its steps are resumed as a run's are): the base's GGUF for the adapters served unmerged, the
base alone on the held-out text, and the references of the adapters that can share one layer-streamed pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import i18n
from ..checkpoint.adapter_format import weights_file
from ..checkpoint.base_model import inspect_base_model
from ..checkpoint.validate import base_quantization
from ..config import ExportConfiguration
from ..errors import ExportError
from ..exporters.onnx_lora import onnx_adapters
from ..monitoring import human_bytes, logger
from ..steps import files_in as _files
from ..steps import fingerprint as _fingerprint
from ..tensor_io import file_sha256
from .export_step import base_gguf, base_onnx, onnx_adapter_spec
from .graph import StepSpec, export_spec
from .preflight import widened_bytes
from .state import RunState

__all__ = ["adapter_checkpoints", "prepare_base", "share_references"]


def prepare_base(
    config: ExportConfiguration,
    base: str,
    folder: Path,
    checkpoints: list[Path] | None = None,
    together: bool = False,
) -> dict[str, Any]:
    """What a batch makes once for all its adapters, under output_dir/base/ (its own run.json; resumed as a run's
    steps are): the base alone on the held-out text, which every adapter's layer-streamed reference reuses; with
    ``together``, the references of the adapters (``checkpoints``, the one each run selects) in one layer-streamed
    pass (verify/references.py), which their runs take instead of computing their own; and, when the batch asks for
    the adapters themselves (batch_outputs adapters or both), what they load on: with gguf the base's GGUF that each
    adapter's LoRA GGUF and Modelfile load on, with onnx the base graph that takes every adapter's LoRA inputs
    (judged alone in onnxruntime-genai on the held-out text). Returns what each adapter's run is given
    (run_adapter's ``shared``)."""
    c, checkpoints = config, checkpoints or []
    info = inspect_base_model(base)
    folder.mkdir(parents=True, exist_ok=True)
    state = RunState(ExportConfiguration(**{**c.model_dump(mode="json"), "output_dir": str(folder), "adapters": []}))
    state.manifest.config = {"base": str(info.path), "batch_outputs": c.batch_outputs}
    shared: dict[str, Any] = {"outputs": c.batch_outputs, "base": str(info.path)}
    if c.batch_outputs != "merged" and "gguf" in c.formats:
        result = state.step(
            export_spec("gguf"),
            [str(info.path), _fingerprint(info.shards)],
            lambda view: base_gguf(view, info.path, folder / "export"),
            outputs=lambda result: _files(result.get("folder")),
        )
        shared["base_gguf"] = result["path"]
    if onnx_adapters(c):  # a base graph once for every adapter's .onnx_adapter
        shared["base_onnx"] = _base_onnx(state, info, folder / "export", checkpoints)
    if c.run_validation_tests and (c.verification_runtime != "transformers" or "base_onnx" in shared):
        shared.update(_shared_verification(state, info, folder / "verify", checkpoints if together else []))
        if "base_onnx" in shared:
            shared["base_onnx_verdict"] = _judge_base_onnx(state, Path(shared["base_onnx"]), folder / "verify")
    return shared


def _base_onnx(state: RunState, info: Any, export: Path, checkpoints: list[Path]) -> str:
    """``export:onnx`` of the base: the graph with LoRA inputs for every module the batch's adapters target
    (exporters/onnx_lora.py), the tokenizer of the first adapter's training run; its folder."""
    from ..exporters.onnx_lora import lora_targets

    targets = lora_targets(checkpoints, info.path)
    result = state.step(
        onnx_adapter_spec("export:onnx"),
        [str(info.path), _fingerprint(info.shards), [[name, *vars(t).values()] for name, t in targets.items()]],
        lambda view: base_onnx(view, info.path, targets, checkpoints[:1], export),
        outputs=lambda result: _files(result.get("folder")),
    )
    return result["folder"]


def _judge_base_onnx(state: RunState, graph: Path, folder: Path) -> dict[str, Any]:
    """``verify:onnx`` of the base: its graph in onnxruntime-genai with no adapter active, on the held-out text,
    against the base alone (verify:heldout's logits); its verdict, also in verify/onnx.json."""
    from ..verify.step import BOUND_KEYS, verdict_record

    heldout = folder / "base-heldout.pt"

    def judge(view: Any) -> dict[str, Any]:
        import torch

        from ..runtimes import precision_of
        from ..verify.artifacts import verify_artifact
        from ..verify.judge import Bounds
        from ..verify.reference import Reference, perplexity

        saved = torch.load(heldout, weights_only=True)  # our own file, read as data only
        reference = Reference([], [], [], [], heldout_ids=saved["ids"], heldout_logits=saved["logits"])
        reference.heldout_perplexity = perplexity(saved["logits"], saved["ids"])
        bounds = Bounds.from_config(view)
        verdict = verify_artifact(graph, reference, bounds, raise_on_failure=False, floor=precision_of(graph))
        return verdict_record(verdict, folder / "onnx.json", False)

    from ..runtimes import runtime_problem

    return state.step(  # whether genai can start here is an input: a verdict not run is run once it can
        StepSpec("verify:onnx", keys=BOUND_KEYS),
        [_fingerprint(_files(str(graph))), _fingerprint([heldout]), runtime_problem(graph)],
        judge,
        outputs=lambda result: [folder / "onnx.json"],
    )


def _shared_verification(state: RunState, info: Any, folder: Path, checkpoints: list[Path]) -> dict[str, Any]:
    """prepare_base's verification steps: for two adapters or more on a base that is not quantized,
    ``verify:references`` (their references in one pass, which scores the base alone on the held-out text as well),
    then ``verify:heldout`` (the base alone on the held-out text: base-heldout.pt, as that pass left it or computed
    now)."""
    from transformers import AutoTokenizer

    from ..verify.reference import _max_positions, _shared_base_logits, base_heldout_logits, heldout_ids
    from ..verify.step import METHOD

    c, path = state.config, folder / "base-heldout.pt"
    limit = min(c.max_sequence_length, _max_positions(info.path))
    ids = heldout_ids(AutoTokenizer.from_pretrained(str(info.path)), limit)
    base = [str(info.path), _fingerprint(info.shards)]
    shared: dict[str, Any] = {}
    if len(checkpoints) >= 2 and not base_quantization(info.path):
        references = folder / "references"
        adapters = [
            [str(p), file_sha256(weights_file(p)), _fingerprint([p / "adapter_config.json"])] for p in checkpoints
        ]
        try:
            _references_step(state, info, [*base, adapters, METHOD], checkpoints, (path, ids), references)
            shared["references"] = str(references)
        except Exception as exc:  # only a saving lost: each adapter's run computes its own reference, as it would alone
            logger.warning(i18n.ui("shared_references_failed", error=f"{type(exc).__name__}: {exc}"))

    def heldout() -> dict[str, Any]:
        if _shared_base_logits(path, ids) is None:  # not left by the references pass
            base_heldout_logits(info.path, ids, save_to=path)
        return {"path": str(path), "tokens": int(ids.numel())}

    state.step(
        StepSpec("verify:heldout", keys=("max_sequence_length",)),
        base,
        lambda view: heldout(),
        outputs=lambda result: [Path(result["path"])] if result.get("path") else [],
    )
    return {"base_heldout": str(path), **shared}


def _references_step(
    state: RunState, info: Any, inputs: list[Any], checkpoints: list[Path], base: tuple[Path, Any], references: Path
) -> None:
    """``verify:references``: shared_references, keeping the base alone on ``base`` (base-heldout.pt, the base's
    held-out ids) where the pass scores it."""
    from ..verify.reference import RunOptions
    from ..verify.references import shared_references
    from ..verify.step import REFERENCE_KEYS, training_tokenizer

    state.step(
        StepSpec("verify:references", keys=REFERENCE_KEYS, reads=("max_memory",)),
        inputs,
        lambda view: shared_references(
            info.path,
            checkpoints,
            [training_tokenizer(c, info.path) for c in checkpoints],
            view.test_input_samples,
            view.validation_new_tokens,
            RunOptions.from_config(view, reference=True),
            base[0],
            references,
            base_ids=base[1],
        ),
        outputs=lambda result: [Path(f) for f in result.get("files", [])],
    )


def share_references(config: ExportConfiguration, info: Any, adapters: int) -> bool:
    """Whether the batch computes its adapters' references in one layer-streamed pass (verify/references.py), said in
    the log: whenever two adapters or more are verified on the local pool (Ray's driver holds no model: its tasks run
    where the cluster has room, each computing its own). The pass reads each base layer once for all of them and
    decodes every adapter's prompts as one batch, where each run alone would read the layers it does not keep on
    every decoding step and decode its three prompts by themselves: at 4B with two adapters 220 s against 360 s, at
    0.6B with eight 246.5 s against 293.9 s even though each of those runs kept its whole base resident
    (docs/benchmarks.md). Scoring each adapter's sequences is the same arithmetic either way."""
    if not config.run_validation_tests or config.executor == "ray" or adapters < 2:
        return False
    logger.info(i18n.ui("batch_references_together", count=adapters, widened=human_bytes(widened_bytes(info))))
    return True


def adapter_checkpoints(config: ExportConfiguration, adapters: list[Any]) -> list[Path]:
    """The checkpoint each adapter's run will select (its detect step), for the references made in one pass; an
    adapter whose checkpoint cannot be found is left to its run, which says why."""
    from ..checkpoint.detect import detect

    found = []
    for adapter in adapters:
        try:
            found.append(Path(detect(adapter.path, config.checkpoint_selection).selected).resolve())
        except ExportError:
            continue
    return found

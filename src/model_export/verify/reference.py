"""The reference every artifact is judged against: the base with the adapter, unmerged, on the prompts and the
held-out text.

The reference generates its greedy continuation of each prompt, then scores every prompt followed by its own tokens in
one pass (teacher-forced), with the held-out text and the base alone on it: each artifact is later run once over
exactly those tokens and compared position by position. Layer-streamed by default (the adapter applied as PEFT applies
it; widened layers kept in memory up to max_memory, so decoding costs compute rather than reads), or loaded whole by
transformers and PEFT (verification_runtime: transformers, or 4-bit/8-bit loading); the base alone on the held-out text
gives the perplexity the adapter changed."""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import MergeError, ValidationError
from ..files import torch_save
from ..monitoring import logger
from .measures import all_finite, entropy, perplexity

__all__ = [
    "Reference",
    "RunOptions",
    "compute_reference",
    "reference_line",
    "fit_length",
    "heldout_ids",
    "base_heldout_logits",
    "check_reference",
    "perplexity",
]


@dataclass
class Reference:
    prompts: list[str]
    input_ids: list[Any]  # one 1-D LongTensor per prompt
    logits: list[Any]  # fp32 logits per prompt over the prompt and its greedy tokens but the last, [seq, vocab]
    greedy: list[list[int]]
    heldout_ids: Any = None  # the bundled held-out text, tokenized (1-D LongTensor)
    heldout_perplexity: float | None = None
    device: str = "cpu"  # where the reference ran
    precision: str = "full"  # full; reduced (base loaded in 8-bit) or int4 (in 4-bit) through bitsandbytes
    base_perplexity: float | None = None  # the base alone (adapter disabled) on the held-out text
    heldout_entropy: float | None = None  # mean entropy (nats) of the next-token distributions on the held-out text
    base_entropy: float | None = None
    other_road: dict | None = None  # a QLoRA adapter: how far merging into the 16-bit weights lands (other_road)
    heldout_logits: Any = None  # fp32 logits on the held-out text: artifacts are judged there too
    kept_in: Any = field(default=None, repr=False, compare=False)  # a batch's file it was read from, not saved with it

    def to_dict(self) -> dict[str, Any]:
        """Its fields as they are (dataclasses.asdict would deep-copy every tensor: 390 MB at the 0.6B shape)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kept_in"}

    def sequences(self) -> list[Any]:
        """What every artifact scores, in one pass (scored_sequences)."""
        return scored_sequences(self.input_ids, self.greedy, self.heldout_ids)


def scored_sequences(input_ids: list[Any], greedy: list[list[int]], heldout: Any) -> list[Any]:
    """Each prompt followed by its greedy tokens but the last (the logits at each position predict the next prompt or
    continuation token, the last one's the last greedy token), then the held-out text when there is one: what the
    reference scores and every artifact is run on."""
    import torch

    scored = [torch.cat([ids, torch.tensor(tokens[:-1], dtype=torch.long)]) for ids, tokens in zip(input_ids, greedy)]
    return scored + ([heldout] if heldout is not None else [])


HELDOUT_TOKENS = 256


def heldout_text() -> str:
    """A short English and Chinese text that no demo or test model was trained on, for perplexity."""
    from importlib import resources

    return resources.files("model_export").joinpath("data", "heldout.txt").read_text(encoding="utf-8")


def encode_prompt(tokenizer: Any, prompt: str):
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def fit_length(ids: Any, new_tokens: int, max_length: int, label: str) -> Any:
    """``ids`` cut so that it and ``new_tokens`` generated tokens fit in ``max_length`` (max_sequence_length, or the
    model's own max_position_embeddings when smaller), with a warning naming the sample."""
    keep = max(max_length - new_tokens, 1)
    if ids.numel() <= keep:
        return ids
    logger.warning(i18n.ui("sample_truncated", sample=label, tokens=ids.numel(), kept=keep, limit=max_length))
    return ids[:keep]


@dataclass(frozen=True)
class RunOptions:
    """How models run in verification: ``batch_size`` sequences per forward pass (batch_size), sequences cut to
    ``max_length`` tokens with the generated ones (max_sequence_length), weight files memory-mapped or read whole
    (use_memory_mapping), on ``device_map``; the streamed reference keeps ``max_memory`` of widened layers."""

    batch_size: int = 1
    max_length: int = 2048
    mmap: bool = True
    device_map: str = "cpu"
    runtime: str = "auto"  # verification_runtime: auto, streamed, transformers
    max_memory: int | str = 0  # what the streamed reference keeps resident (max_memory: auto, a size, 0)
    resident_cap: int | None = None  # auto at most this: what the run's memory plan leaves (preflight.resident_cap)

    @classmethod
    def from_config(cls, config: Any, reference: bool = False) -> RunOptions:
        """How an artifact runs (batch_size, use_memory_mapping, device_map, verification_runtime); for the reference
        also how long its sequences may be (max_sequence_length) and what it keeps resident (max_memory)."""
        options = cls(
            batch_size=config.batch_size,
            mmap=config.use_memory_mapping,
            device_map=config.device_map,
            runtime=config.verification_runtime,
        )
        if reference:
            options = replace(options, max_length=config.max_sequence_length, max_memory=config.max_memory)
        return options

    def placed(self, device_map: str | None) -> RunOptions:
        return self if device_map is None else replace(self, device_map=device_map)


MARGIN = 2 << 30  # max_memory auto: what stays free besides a quarter of the available memory


def memory_budget(setting: int | str, cap: int | None = None) -> int:
    """Bytes the streamed reference may keep resident: max_memory as a size, or auto: in a batch's adapter or beside
    the export, the share it was given (RESIDENT_ENV); else the memory available now less a quarter of it and at least
    2 GiB, and at most ``cap`` (what the run's memory plan leaves: preflight.resident_cap)."""
    if str(setting).strip().lower() != "auto":
        from ..files import parse_size

        return parse_size(setting)
    from ..monitoring import RESIDENT_ENV

    share = os.environ.get(RESIDENT_ENV, "")
    if share.isdigit():
        return int(share)
    import psutil

    available = psutil.virtual_memory().available
    budget = max(available - max(available // 4, MARGIN), 0)
    return budget if cap is None else min(budget, max(cap, 0))


def reference_line(device: str, precision: str) -> str:
    """Where the reference ran, and in what precision, in words (the log and report.html)."""
    bits = {"int4": " (bitsandbytes 4-bit)", "reduced": " (bitsandbytes 8-bit)"}.get(precision, "")
    return i18n.ui("reference_device", device=device, quantized=bits)


def release(device: str) -> None:
    """After a model or runtime is closed: collect it, and give the freed heap back to the system (a runtime's arena
    freed at close stayed resident under the next artifact's runtime)."""
    from ..merging.streamed import trim_heap

    gc.collect()
    trim_heap()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


@dataclass
class _Asked:
    """What a reference is computed on: the prompts and their token ids, the held-out text's ids, how many tokens each
    prompt generates, and how the model runs."""

    prompts: list[str]
    encoded: list[Any]
    heldout: Any
    new_tokens: int
    options: RunOptions

    def scored(self, greedy: list[list[int]]) -> list[Any]:
        """Each prompt with its greedy tokens but the last, then the held-out text (scored_sequences)."""
        return scored_sequences(self.encoded, greedy, self.heldout)


def _whole_reference(device: str, base_dir: Path, checkpoint: Path, asked: _Asked, bits: int | None) -> Reference:
    """The reference by transformers and PEFT with the whole model loaded on ``device`` (bitsandbytes' 4-bit or 8-bit
    base with ``bits``, on a GPU)."""
    import torch
    from peft import PeftModel

    from ..checkpoint.loading import load_model
    from ..runtimes.hf import greedy, prompt_logits

    if bits and device != "cuda":  # fell back to the CPU after a CUDA out-of-memory
        logger.warning(i18n.ui("bits_without_cuda", bits=bits))
        bits = None
    precision = {4: "int4", 8: "reduced", None: "full"}[bits]
    logger.info(reference_line(device, precision))
    model = load_model(
        str(base_dir),
        dtype=torch.float32,
        device_map=device,
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        disable_mmap=not asked.options.mmap,
    )
    try:
        model = PeftModel.from_pretrained(model, str(checkpoint)).eval()
        tokens = [greedy(model, ids, asked.new_tokens) for ids in asked.encoded]
        logits = prompt_logits(model, asked.scored(tokens), asked.options.batch_size)
        with model.disable_adapter():  # the base alone on the held-out text: what the adapter changed
            base_logits = prompt_logits(model, [asked.heldout])[0]
    finally:
        del model
        release(device)
    return _reference(asked, tokens, logits, base_measures(base_logits, asked.heldout), device, precision)


def compute_reference(
    base_dir: Path,
    checkpoint: Path,
    tokenizer_dir: Path,
    prompts: list[str],
    new_tokens: int,
    *,
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    options: RunOptions = RunOptions(),
    base_heldout: Path | None = None,
    shared: Any = None,
) -> Reference:
    """Logits and greedy tokens of base + adapter through PEFT, unmerged, in fp32; the model is released after.

    ``base_heldout`` is a file of base_heldout_logits (a batch makes it once for all its adapters): the base alone on
    the held-out text, reused by the layer-streamed reference when its token ids are this tokenizer's. ``shared``, given
    what is asked (the prompts' and held-out text's ids, the new tokens), returns the reference a batch made for this
    adapter in its one pass for all (references.take_shared) when it was made from the same, else None.

    ``options.device_map`` places it (cpu, cuda, auto: the GPU when there is one, the CPU after a CUDA out-of-memory);
    ``load_in_4bit`` / ``load_in_8bit`` load the base through bitsandbytes on the GPU (then the reference itself is
    approximate, and the artifacts are judged on the bounds of that precision). Every sequence is cut to
    ``options.max_length`` (or the model's max_position_embeddings) with its generated tokens.
    """
    from transformers import AutoTokenizer

    from ..checkpoint.loading import on_device, resolve_device

    options = options.placed(device_map)
    if (load_in_4bit or load_in_8bit) and resolve_device(options.device_map) != "cuda":
        # bitsandbytes needs CUDA: said once, and the reference is then computed as without the setting (streamed)
        logger.warning(i18n.ui("bits_without_cuda", bits=4 if load_in_4bit else 8))
        load_in_4bit = load_in_8bit = False
    limit = min(options.max_length, _max_positions(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoded = [fit_length(encode_prompt(tokenizer, p), new_tokens, limit, repr(p[:40])) for p in prompts]
    asked = _Asked(prompts, encoded, heldout_ids(tokenizer, limit), new_tokens, options)
    bits = 4 if load_in_4bit else 8 if load_in_8bit else None

    def work(device: str) -> Reference:
        return _whole_reference(device, base_dir, checkpoint, asked, bits)

    refused, reference = _not_streamed(options, base_dir, checkpoint, load_in_4bit or load_in_8bit), None
    if refused is None and shared is not None:
        reference = shared(asked)
    if refused is None and reference is None:
        try:
            reference = _streamed_reference(base_dir, checkpoint, asked, base_heldout)
        except MergeError as exc:  # an adapter feature the plan (the merge's, and so the streamed pass's) refuses
            refused = str(exc)
    if reference is None:
        if options.runtime != "transformers":
            logger.info(i18n.ui("streamed_fallback", reason=refused))
        reference = on_device(options.device_map, work, what=i18n.ui("doing_reference"))
    check_reference(reference, checkpoint)
    return reference


def _not_streamed(options: RunOptions, base_dir: Path, checkpoint: Path, bitsandbytes: bool) -> str | None:
    """Why the reference is not computed layer by layer (verification_runtime), or None when it is."""
    from ..checkpoint.adapter_format import read_adapter_config
    from ..checkpoint.loading import resolve_device
    from ..merging.streamed import streamable

    if options.runtime == "transformers":
        return i18n.ui("streamed_off")
    if bitsandbytes:
        return i18n.ui("streamed_bitsandbytes")
    if options.runtime == "auto" and resolve_device(options.device_map) == "cuda":
        return i18n.ui("streamed_gpu")
    return streamable(base_dir, read_adapter_config(checkpoint))


def _streamed_reference(base_dir: Path, checkpoint: Path, asked: _Asked, base_heldout: Path | None = None) -> Reference:
    """The reference through the layer-streamed pass on the CPU (merging/streamed.py), which agrees with PEFT's unmerged
    model to fp32 rounding: the prompts decoded together (one pass per token, the layers that fit in max_memory kept
    between passes), then one pass over every prompt with its tokens, the held-out text and (unless a batch's base/
    has it) the base alone on the held-out text."""
    from ..merging.streamed import StreamedModel
    from ..monitoring import human_bytes
    from ..runtimes.streamed import greedy_lockstep, score_streamed

    budget = memory_budget(asked.options.max_memory, asked.options.resident_cap)
    model = StreamedModel(base_dir, checkpoint, max_memory=budget)
    layers = model.config.num_hidden_layers
    logger.info(i18n.ui("streamed_reference", layers=layers, budget=human_bytes(budget)))
    logger.info(reference_line("cpu", "full"))
    label = i18n.ui("label_reference")
    base_logits = _shared_base_logits(base_heldout, asked.heldout)
    try:
        tokens = greedy_lockstep(model, asked.encoded, asked.new_tokens, model.eos_ids, label=label)
        scored = asked.scored(tokens)
        adapters = None
        if base_logits is None:  # the base alone on the held-out text, in the same pass
            adapters = [0] * len(scored) + [-1]
            scored.append(asked.heldout)
        logits = score_streamed(model, scored, adapters, label=label)
        head = i18n.ui("streamed_resident_head") if model.model.lm_head.resident is not None else ""
        logger.info(
            i18n.ui(
                "streamed_resident",
                kept=len(model.resident),
                layers=layers,
                head=head,
                memory=human_bytes(model.resident_bytes),
                passes=max(len(t) for t in tokens) + 1,
            )
        )
    finally:
        model.close()
    if base_logits is None:
        base_logits = logits.pop()
    return _reference(asked, tokens, logits, base_measures(base_logits, asked.heldout), "cpu", "full")


def heldout_ids(tokenizer: Any, limit: int) -> Any:
    """The bundled held-out text as the reference tokenizes it, cut to ``limit`` positions."""
    import torch

    ids = torch.tensor(
        tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][:HELDOUT_TOKENS], dtype=torch.long
    )
    return fit_length(ids, 0, limit, "held-out text")


def base_heldout_logits(base_dir: Path, heldout: Any, save_to: Path | None = None) -> Any:
    """The base alone on the held-out text (what an adapter changed is measured against it), layer-streamed; saved
    with its token ids to ``save_to`` when given (a batch's base/, for every adapter's reference)."""
    from ..merging.streamed import StreamedModel
    from ..runtimes.streamed import score_streamed

    base = StreamedModel(base_dir)
    try:
        logits = score_streamed(base, [heldout], label=i18n.ui("label_base"))[0]
    finally:
        base.close()
    if save_to is not None:
        save_base_logits(save_to, heldout, logits)
    return logits


def save_base_logits(path: Path, heldout: Any, logits: Any) -> None:
    """The base alone on the held-out text, with its token ids, where a batch keeps it (base/verify/base-heldout.pt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch_save({"ids": heldout, "logits": logits}, partial, crc=False)
    os.replace(partial, path)


def _shared_base_logits(path: Path | None, heldout: Any) -> Any:
    """The batch's base logits on the held-out text when they were made from these very token ids, else None."""
    if path is None or not Path(path).is_file():
        return None
    import torch

    saved = torch.load(path, weights_only=True)
    if saved["ids"].shape != heldout.shape or not torch.equal(saved["ids"], heldout):
        return None
    logger.info(i18n.ui("base_logits_shared", path=path))
    return saved["logits"]


def base_measures(base_logits: Any, heldout: Any) -> tuple[float, float]:
    """(perplexity, entropy) of the base alone on the held-out text, from its logits there: what an adapter changed."""
    return perplexity(base_logits, heldout), entropy(base_logits)


def _reference(
    asked: _Asked, tokens: list[list[int]], logits: list[Any], base: tuple[float, float], device: str, precision: str
) -> Reference:
    """The Reference from the greedy tokens of every prompt, the logits of what was scored (every prompt with its
    tokens, then the held-out text), and the base's measures on the held-out text (base_measures)."""
    heldout_logits = logits[-1]
    return Reference(
        asked.prompts,
        asked.encoded,
        logits[:-1],
        tokens,
        asked.heldout,
        perplexity(heldout_logits, asked.heldout),
        device,
        precision,
        base[0],
        entropy(heldout_logits),
        base[1],
        heldout_logits=heldout_logits,
    )


def check_reference(reference: Reference, checkpoint: Path) -> None:
    """A reference that is itself garbage cannot vouch for anything (ME604): logits that are not finite (the adapter's
    update overflows), or an adapter that makes a base's predictions uniform: on the held-out text, a mean entropy
    within
    2% of log(vocabulary size), or a perplexity at or above the vocabulary size, where the base alone is clearly better
    (entropy below 90% of that bound, perplexity below the vocabulary size). A base that is itself no better than chance
    (a randomly initialized test model) is not judged this way."""
    vocab = reference.logits[0].shape[-1] if reference.logits else 0
    if not all(all_finite(logits) for logits in reference.logits):
        raise ValidationError("reference_broken", checkpoint=str(checkpoint), problem=i18n.ui("reference_nonfinite"))
    if not vocab or reference.base_entropy is None or reference.heldout_entropy is None:
        return
    uniform = math.log(vocab)
    flat = reference.heldout_entropy >= 0.98 * uniform and reference.base_entropy < 0.9 * uniform
    worse = (reference.heldout_perplexity or 0) >= vocab and (reference.base_perplexity or math.inf) < vocab
    if flat or worse:
        raise ValidationError(
            "reference_broken",
            checkpoint=str(checkpoint),
            problem=i18n.ui(
                "reference_uniform",
                perplexity=reference.heldout_perplexity,
                vocab=vocab,
                base=reference.base_perplexity,
                entropy=reference.heldout_entropy,
                base_entropy=reference.base_entropy,
                uniform=uniform,
            ),
        )


def _max_positions(model_dir: Path) -> int:
    """The model's max_position_embeddings (no limit when its config.json does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return int(config.get("max_position_embeddings") or 2**31)
    except (OSError, ValueError, TypeError, AttributeError):
        return 2**31


def other_road(base_dir: Path, checkpoint: Path, tokenizer_dir: Path, reference: Reference, options: RunOptions) -> Any:
    """For a QLoRA adapter merged into the dequantized weights of a 16-bit base quantized as its training did
    (base_model_quantization): the same adapter on the 16-bit weights as they are, judged against the reference (mean
    KL, top-1 agreement, perplexity on the held-out text) - what merging into the original weights would cost. None
    for any other base (a pre-quantized base holds no 16-bit weights to compare)."""
    import torch

    from ..checkpoint.quantized_base import MARKER

    marker = Path(base_dir) / MARKER
    record = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    if not record.get("stated"):
        return None
    source = Path(record["source"])
    other = compute_reference(source, checkpoint, tokenizer_dir, reference.prompts, 1, options=options)
    kls, top1 = [], []
    for ids, full, short in zip(reference.input_ids, reference.logits, other.logits):  # the prompts' positions
        ours, theirs = full[: ids.numel()], short[: ids.numel()]
        p, q = ours.float().log_softmax(-1), theirs.float().log_softmax(-1)
        kls.append(float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()))
        top1.append(float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()))
    return {
        "base": str(source),
        "mean_kl": sum(kls) / len(kls),
        "top1": sum(top1) / len(top1),
        "perplexity": other.heldout_perplexity,
    }

"""A batch's references in one layer-streamed pass: the adapters that run on the base's own tensors decoded together
and scored together, so that each base layer is read (and, kept resident, multiplied as one larger batch) once per pass
for all of them instead of once per adapter. Each adapter's Reference is saved under the batch's base/ folder, named
by its checkpoint; its run takes it instead of computing its own while it was made from the same inputs (the same
base, adapter weights, prompts and their token ids, held-out ids and number of new tokens), else computes as always
(compute_reference's ``shared``).

An adapter the pass cannot take - one that saves whole tensors in place of the base's or unties the head
(merging.streamed.shares_base), or whose reference is not layer-streamed (verification_runtime, a GPU) - is left to
its run; with fewer than two left there is nothing to share and nothing is written.

    made = shared_references(base_dir, checkpoints, tokenizers, prompts, new_tokens, options, base_heldout, folder)
    reference = take_shared(folder, checkpoint, base_dir, asked)      # in the run: None unless it is the same
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import ValidationError
from ..files import torch_save
from ..monitoring import logger
from .reference import check_reference

__all__ = ["load_reference", "shared_path", "shared_references", "take_shared"]


def shared_path(folder: str | Path, checkpoint: str | Path) -> Path:
    """Where a batch keeps the reference of ``checkpoint`` (named by its resolved path)."""
    digest = hashlib.sha256(str(Path(checkpoint).resolve()).encode("utf-8")).hexdigest()[:16]
    return Path(folder) / f"{digest}.pt"


def _adapter_digest(checkpoint: Path) -> str:
    from ..checkpoint.adapter_format import weights_file
    from ..tensor_io import file_sha256

    config = (Path(checkpoint) / "adapter_config.json").read_bytes()
    return file_sha256(weights_file(Path(checkpoint))) + hashlib.sha256(config).hexdigest()[:16]


def _left_out(base_dir: Path, checkpoint: Path, options: Any, info: Any, base_plan: Any) -> str | None:
    """Why this adapter's reference cannot be in the shared pass (None when it can): among others, whatever its run's
    check step would refuse it for (its run then says so). ``info`` and ``base_plan``: the base's, made once."""
    from ..checkpoint.adapter_format import read_adapter_config
    from ..checkpoint.validate import validate_checkpoint
    from ..errors import ExportError
    from ..merging.plan import adapter_plan
    from ..merging.streamed import shares_base
    from .reference import _not_streamed

    try:
        validate_checkpoint(checkpoint, str(base_dir), progress=False)
        why = _not_streamed(options, base_dir, checkpoint, False)
        if why is not None:
            return why
        plan, _ = adapter_plan(checkpoint, read_adapter_config(checkpoint), info, "fp32", False)
    except ExportError as exc:
        return str(exc)
    return None if shares_base(plan, base_plan) else i18n.ui("shared_own_tensors")


def shared_references(
    base_dir: Path,
    checkpoints: list[Path],
    tokenizers: list[Path],
    prompts: list[str],
    new_tokens: int,
    options: Any,
    base_heldout: Path | None,
    folder: Path,
    base_ids: Any = None,
) -> dict[str, Any]:
    """Every eligible adapter's reference from one greedy decoding of all their prompts together, then their sequences
    scored together (and the base alone on each held-out text, unless ``base_heldout`` has it) in as few passes as
    keep the logits under SCORE_BYTES; each saved to shared_path(folder, checkpoint). With ``base_ids`` (the held-out
    ids of the base's own tokenizer) the base alone on them is scored in the first pass too, unless ``base_heldout``
    has it, and saved there: the batch's verify:heldout then finds it made (and lists it as its own). Returns what was
    made: the references' files, and each adapter left to its run with why."""
    from ..checkpoint.base_model import inspect_base_model
    from ..merging.plan import make_plan
    from ..merging.streamed import StreamedModel
    from ..runtimes.streamed import greedy_lockstep
    from .reference import memory_budget

    info = inspect_base_model(str(base_dir))
    plan = make_plan({}, {}, {}, info, "fp32", False)
    left = {str(c): why for c in checkpoints if (why := _left_out(base_dir, c, options, info, plan)) is not None}
    tokenizer = {str(c): t for c, t in zip(checkpoints, tokenizers)}
    taken = [c for c in checkpoints if str(c) not in left]
    if len(taken) < 2:
        return {"files": [], "left": left}
    # each adapter's tokenizer folder, a sweep's mostly the base's: each folder loaded once, not once per adapter
    folders = [Path(tokenizer[str(c)]).resolve() for c in taken]
    by_folder = {f: _asked(base_dir, f, prompts, new_tokens, options) for f in dict.fromkeys(folders)}
    asks = [by_folder[f] for f in folders]
    logger.info(i18n.ui("shared_references", count=len(taken)))
    label = i18n.ui("label_references", count=len(taken))
    model = StreamedModel(base_dir, taken, max_memory=memory_budget(options.max_memory, options.resident_cap))
    try:
        numbers = [k for k, asked in enumerate(asks) for _ in asked.encoded]
        inputs = [ids for asked in asks for ids in asked.encoded]
        decoded = greedy_lockstep(model, inputs, new_tokens, model.eos_ids, label, adapters=numbers)
        tokens = [[t for t, n in zip(decoded, numbers) if n == k] for k in range(len(asks))]
        files = []
        bases: dict[bytes, tuple[float, float]] = {}
        keep = (base_heldout, base_ids) if base_heldout is not None and base_ids is not None else None
        for group in _groups(asks, tokens, model.config.vocab_size):
            references = _score(model, group, asks, tokens, base_heldout, label, bases, keep)
            for k, reference in references.items():
                try:  # a reference that cannot vouch for anything is not kept: its run says why
                    check_reference(reference, taken[k])
                except ValidationError as exc:
                    left[str(taken[k])] = str(exc)
                    continue
                files.append(str(_save(folder, taken[k], base_dir, new_tokens, reference)))
    finally:
        model.close()
    return {"files": files, "left": left}


SCORE_BYTES = 1 << 30  # the logits one scoring pass of the shared references may hold (and copy once)


def _groups(asks: list[Any], tokens: list[list[list[int]]], vocab: int) -> list[list[int]]:
    """The adapters scored together, in order: as many as keep their logits (every position of every sequence, the
    held-out text twice for the base alone, each value and its copy) under SCORE_BYTES, at least one (the packing of
    sequences into a scoring pass's rows, runtimes.streamed.pack, applied to adapters and bytes)."""
    from ..runtimes.streamed import pack

    sizes = [
        (sum(int(s.numel()) for s in asked.scored(tokens[k])) + int(asked.heldout.numel())) * vocab * 4 * 2
        for k, asked in enumerate(asks)
    ]
    return pack(sizes, SCORE_BYTES)


def _score(
    model: Any,
    group: list[int],
    asks: list[Any],
    tokens: list[Any],
    held: Path | None,
    label: str,
    bases: dict,
    keep: tuple[Path, Any] | None = None,
) -> dict:
    """The references of the adapters in ``group`` from one scoring pass of their sequences (each prompt with its
    tokens, the held-out text, and the base alone on it where no shared file has it). ``bases``: the base's measures
    on each held-out text (reference.base_measures), by its token ids, taken once for the whole pass. ``keep``: (path,
    ids) of the base alone to score here too, unless measured already, and save to the path."""
    from ..runtimes.streamed import score_streamed
    from .reference import _reference, _shared_base_logits, base_measures, save_base_logits

    scored, owners, spans, alone = [], [], {}, {}
    for k in group:
        sequences = asks[k].scored(tokens[k])
        spans[k] = (len(scored), len(scored) + len(sequences))
        scored += sequences
        owners += [k] * len(sequences)
    heldouts = [asks[k].heldout for k in group] + ([keep[1]] if keep is not None else [])
    for ids in heldouts:  # the base alone on each held-out text: from the shared file, or once in this pass
        key = _ids_key(ids)
        if key in bases or key in alone:
            continue
        base_logits = _shared_base_logits(held, ids)
        if base_logits is not None:
            bases[key] = base_measures(base_logits, ids)
        else:
            alone[key] = (len(scored), ids)
            scored.append(ids)
            owners.append(-1)
    logits = score_streamed(model, scored, owners, label=label)
    for key, (row, ids) in alone.items():
        bases[key] = base_measures(logits[row], ids)
        if keep is not None and key == _ids_key(keep[1]):
            save_base_logits(keep[0], ids, logits[row])
    references = {}
    for k in group:
        start, stop = spans[k]
        base = bases[_ids_key(asks[k].heldout)]
        references[k] = _reference(asks[k], tokens[k], logits[start:stop], base, "cpu", "full")
    return references


def _ids_key(ids: Any) -> bytes:
    return ids.numpy().tobytes()


def _asked(base_dir: Path, tokenizer_dir: Path, prompts: list[str], new_tokens: int, options: Any) -> Any:
    """What compute_reference would ask of this adapter's reference: its tokenizer's prompts and held-out ids."""
    from transformers import AutoTokenizer

    from .reference import _Asked, _max_positions, encode_prompt, fit_length, heldout_ids

    limit = min(options.max_length, _max_positions(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoded = [fit_length(encode_prompt(tokenizer, p), new_tokens, limit, repr(p[:40])) for p in prompts]
    return _Asked(prompts, encoded, heldout_ids(tokenizer, limit), new_tokens, options)


def _save(folder: Path, checkpoint: Path, base_dir: Path, new_tokens: int, reference: Any) -> Path:

    path = shared_path(folder, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    made = {"base": str(base_dir), "adapter": _adapter_digest(checkpoint), "new_tokens": new_tokens}
    partial = path.with_name(path.name + ".partial")
    torch_save({"made": made, "reference": reference.to_dict()}, partial, crc=False)
    os.replace(partial, path)
    return path


def take_shared(folder: str | Path | None, checkpoint: Path, base_dir: Path, asked: Any) -> Any:
    """The batch's reference of ``checkpoint`` when one was made from exactly what ``asked`` asks (else None)."""
    path = shared_path(folder, checkpoint) if folder is not None else None
    if path is None or not path.is_file():
        return None
    import torch

    from .reference import Reference

    saved = torch.load(path, weights_only=True)  # our own file, read as data only
    made, data = saved["made"], saved["reference"]
    same = (
        made == {"base": str(base_dir), "adapter": _adapter_digest(checkpoint), "new_tokens": asked.new_tokens}
        and data["prompts"] == asked.prompts
        and len(data["input_ids"]) == len(asked.encoded)
        and all(torch.equal(a, b) for a, b in zip(data["input_ids"], asked.encoded))
        and torch.equal(data["heldout_ids"], asked.heldout)
    )
    if not same:
        return None
    logger.info(i18n.ui("shared_reference_taken", path=path))
    reference = Reference(**data)
    reference.kept_in = path  # the run's cache of it can be this very file (step.compute_cached)
    return reference


def load_reference(path: Path) -> Any:
    """The Reference in a file a run keeps it in (verify/.reference.cache): saved by the run, or the batch's file of
    it, which the cache is a link to."""
    import torch

    from .reference import Reference

    saved = torch.load(path, weights_only=True)  # our own file, read as data only
    return Reference(**(saved["reference"] if "made" in saved else saved))

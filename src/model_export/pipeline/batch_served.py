"""A batch's adapters in one vLLM server (``verification_servers: [vllm]``): once every adapter's run is done, vLLM
serves the base with every adapter as a LoRA (``--enable-lora --lora-modules a=... b=...``, what a user deploys), and
each adapter is judged on its own reference (its run's verify/.reference.cache) as ``peft@vllm``.

One server for the batch instead of one per adapter: vLLM starts once (about 30 s for the demo model here, minutes
for a 4B model) and loads the base once. The verdicts go into each adapter's run (verify/peft@vllm.json), its line in
batch.json (a row and the counts) and batch.json's ``served`` record, whose key (the adapters' files and references,
the interpreter, the keys it reads) lets a rerun keep them while nothing changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import i18n
from ..checkpoint.base_model import tokenizer_source
from ..files import strict_json, write_atomic
from ..monitoring import logger
from ..steps import fingerprint, key_hash

__all__ = ["serve_batch", "with_served"]

LABEL = "peft@vllm"
_READS = ("max_sequence_length", "vllm_python")


def _entries(out: Path, lines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each adapter whose run is done and verified its reference: its name, the folder vLLM loads, its reference and
    training tokenizer."""
    from ..verify.served import lora_folder
    from ..verify.step import REFERENCE_CACHE

    entries = []
    for name, line in sorted(lines.items()):  # in the order of their names, whatever order they finished in
        run_dir = out / name
        cache = run_dir / "verify" / REFERENCE_CACHE
        checkpoint = line.get("checkpoint")
        if line.get("status") != "done" or not cache.is_file() or not checkpoint:
            continue
        artifacts = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["steps"]["export"]["result"]
        folder = lora_folder(artifacts.get("artifacts", {}), Path(checkpoint)).resolve()
        tokenizer = tokenizer_source([Path(checkpoint), Path(checkpoint).parent])
        entries.append({"name": name, "folder": folder, "cache": cache, "tokenizer": tokenizer, "run": run_dir})
    return entries


def serve_batch(
    config: Any, base: str, out: Path, lines: dict[str, dict[str, Any]], previous: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Serve every done adapter of the batch in one vLLM server and judge each; returns batch.json's ``served``
    record ({key, server, verdicts: name -> verdict}), the previous one when its key holds, None when no server is
    asked for."""
    from ..runtimes.vllm import vllm_problem, vllm_python

    if "vllm" not in config.verification_servers or not config.run_validation_tests:
        return None
    entries = _entries(out, lines)
    python = vllm_python(config.vllm_python)
    values = {key: getattr(config, key) for key in _READS}
    files = [
        [e["name"], fingerprint(sorted(p for p in e["folder"].rglob("*") if p.is_file()) + [e["cache"]])]
        for e in entries
    ]
    key = key_hash([base, files, values, vllm_problem(python), _bounds(config)])
    if (
        previous
        and previous.get("key") == key
        and all((e["run"] / "verify" / f"{LABEL}.json").is_file() for e in entries)
    ):
        logger.info(i18n.ui("unit_kept", unit=f"verify:{LABEL}"))
        return previous
    verdicts = _judge_all(config, Path(base), entries, python, out / "base" / "verify" / f"{LABEL}.log")
    for entry in entries:
        write_atomic(entry["run"] / "verify" / f"{LABEL}.json", strict_json(verdicts[entry["name"]]))
    return {"key": key, "verdicts": verdicts}


def _bounds(config: Any) -> list[float]:
    import dataclasses

    from ..verify.judge import Bounds

    return list(dataclasses.astuple(Bounds.from_config(config)))


def _judge_all(config: Any, base: Path, entries: list[dict[str, Any]], python: str, log: Path) -> dict[str, Any]:
    """One server, every adapter: each adapter's verdict (as a dict), or each not run / failed when the server could
    not start or failed."""

    from ..runtimes import precision_of
    from ..runtimes.vllm import ServerFailed, vllm_problem
    from ..verify.judge import Bounds, not_run
    from ..verify.references import load_reference
    from ..verify.served import judge_on_server, lora_server, unserved

    precision = precision_of(base)
    problem = vllm_problem(python)
    if problem is not None:
        return {e["name"]: not_run(e["folder"], precision, problem).to_dict() for e in entries}
    if not entries:
        return {}
    tokenizer = entries[0]["tokenizer"]
    loras = {e["name"]: e["folder"] for e in entries}
    server = lora_server(base, loras, Path(tokenizer) if tokenizer else None, python, config.max_sequence_length, log)
    verdicts = {}
    try:
        with server:
            for e in entries:
                reference = load_reference(e["cache"])
                asked = (e["name"], LABEL, e["folder"], reference, Path(e["tokenizer"] or base))
                verdict = judge_on_server(
                    server,
                    *asked,
                    bounds=Bounds.from_config(config),
                    floor=precision,
                    precision=precision,
                    log=log,
                )
                verdicts[e["name"]] = verdict.to_dict()
    except ServerFailed as exc:
        for e in entries:
            if e["name"] not in verdicts:
                verdicts[e["name"]] = unserved(exc, server, e["folder"], precision, log).to_dict()
    return verdicts


def with_served(line: dict[str, Any], verdict: dict[str, Any] | None) -> dict[str, Any]:
    """An adapter's batch.json line with its ``peft@vllm`` verdict as a row of its artifacts and in its counts."""
    if verdict is None:
        return line
    rows = [r for r in line.get("artifacts", []) if r.get("format") != LABEL]
    rows.append(
        {
            "format": LABEL,
            "path": verdict["artifact"],
            "bytes": sum(p.stat().st_size for p in Path(verdict["artifact"]).rglob("*") if p.is_file()),
            "status": verdict["status"],
            "reason": verdict.get("reason") or verdict.get("error"),
            "runtime": verdict.get("runtime"),
            "max_abs_diff": verdict.get("max_abs_diff"),
            "mean_kl": verdict.get("mean_kl"),
            "top1": verdict.get("top1_agreement"),
            "perplexity": verdict.get("perplexity"),
        }
    )
    statuses = [r.get("status") for r in rows]
    counts = {status: statuses.count(status) for status in ("verified", "failed", "not_run")}
    return {**line, "artifacts": rows, "counts": counts}

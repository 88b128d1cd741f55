"""Verification in a server users deploy with (``verification_servers: [vllm]``): the merged safetensors folder (plain,
or int8/int4 compressed-tensors) served by vLLM, and the adapter served unmerged as a LoRA on the base
(``--enable-lora --lora-modules``), each judged against the same reference as every other artifact.

What the server is asked, per reference input (the chat-templated prompt followed by the reference's greedy tokens, as
token ids: teacher-forced, as every artifact is judged), in one completion request of one token: the top-k
log-probabilities at every position (``prompt_logprobs``, and ``logprobs`` for the last); the held-out text is asked
the same way (its positions join the metrics, and its own tokens' log-probabilities, which vLLM returns beside the
top-k, give the perplexity). Metrics on the top-k vLLM returns (k = 20, vLLM's default ``--max-logprobs``):
top-1 agreement with the reference's argmax, KL between the reference and vLLM over the tokens vLLM returned (both
renormalized on that shared support), the largest log-probability difference on them (the full-precision rule), and
greedy agreement read off vLLM's top token along the reference's tokens. Then the serving check, in the same server: its
chat template rendering (``/tokenize`` with the messages) against ``apply_chat_template``, and that a generation that
reaches the end-of-turn token stops there (the token forced by ``logit_bias``; vLLM stops on its stop set).

A server that cannot start (no vLLM in the interpreter, no kernel for a quantization in its CPU build) is ``not run``
with vLLM's own reason; an adapter vLLM refuses at start (``--lora-modules``) fails, with vLLM's reason: the user asked
whether it can be served that way, and it cannot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import i18n
from ..errors import ValidationError
from ..monitoring import logger
from ..runtimes import precision_of
from .judge import ArtifactVerdict, Bounds, SampleResult, judge, not_run

__all__ = [
    "verify_served",
    "judge_on_server",
    "served_targets",
    "lora_folder",
    "lora_rank",
    "lora_server",
    "model_dtype",
    "served_length",
    "unserved",
    "server_record",
    "compare_topk",
    "SERVERS",
    "TOP_K",
]

SERVERS = ("vllm",)
TOP_K = 20
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


def served_targets(
    artifacts: dict[str, str], checkpoint: Path, servers: list[str], in_batch: bool = False
) -> list[tuple[str, Path]]:
    """(label, path) of what each server in ``servers`` verifies in one run: ``safetensors@vllm`` (the safetensors
    artifact) and ``adapter@vllm``, the run's adapter as a LoRA on the base - except in a batch, whose adapters are
    served together in one server once every adapter's run is done (pipeline/batch_served.py)."""
    targets: list[tuple[str, Path]] = []
    if "vllm" in servers:
        if "safetensors" in artifacts:
            targets.append(("safetensors@vllm", Path(artifacts["safetensors"])))
        if not in_batch:
            targets.append(("adapter@vllm", checkpoint))
    return targets


def lora_folder(artifacts: dict[str, str], checkpoint: Path) -> Path:
    """What vLLM loads as the adapter: a batch's PEFT folder (export/peft) when there is one, else the checkpoint."""
    return Path(artifacts["peft"]) if "peft" in artifacts else checkpoint


def model_dtype(folder: Path) -> str:
    """The dtype a model folder's config names (what a user serves it in): float32, bfloat16 or float16."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def served_length(folder: Path, configured: int) -> int:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return min(configured, int(config.get("max_position_embeddings") or configured))


def lora_rank(adapter: Path) -> int:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    rank = max([int(config.get("r") or 8), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    return next((r for r in _LORA_RANKS if r >= rank), rank)


def _server(label: str, path: Path, base_dir: Path, tokenizer: Path, python: str, max_len: int, log: Path) -> Any:
    """The server for one unit, and the model name its requests use."""
    from ..runtimes.vllm import VllmServer

    if label == "safetensors@vllm":
        path = path.resolve()
        server = VllmServer(path, python=python, dtype=model_dtype(path), max_len=served_length(path, max_len), log=log)
        return server, server.name
    return lora_server(base_dir, {"adapter": path}, tokenizer, python, max_len, log), "adapter"


def lora_server(
    base_dir: Path, loras: dict[str, Path], tokenizer: Path | None, python: str, max_len: int, log: Path
) -> Any:
    """vLLM serving ``base_dir`` with each of ``loras`` (name -> PEFT folder) as a LoRA, at the largest rank among
    them; with ``--tokenizer`` when the training tokenizer is not the base's own folder."""
    from ..runtimes.vllm import VllmServer

    base_dir = base_dir.resolve()
    extra = {"tokenizer": tokenizer.resolve()} if tokenizer and tokenizer.resolve() != base_dir else {}
    return VllmServer(
        base_dir,
        python=python,
        dtype=model_dtype(base_dir),
        max_len=served_length(base_dir, max_len),
        log=log,
        loras={name: folder.resolve() for name, folder in loras.items()},
        max_lora_rank=max(lora_rank(folder) for folder in loras.values()),
        **extra,
    )


def _top(entry: dict[str, float]) -> dict[int, float]:
    """A logprobs dict of vLLM's (keys "token_id:N" or "N"; values a float or {"logprob": x}) as id -> logprob."""
    found = {}
    for key, value in entry.items():
        token = int(str(key).rsplit(":", 1)[-1])
        found[token] = float(value["logprob"] if isinstance(value, dict) else value)
    return found


def _ask(server: Any, model: str, ids: list[int]) -> list[dict[int, float]]:
    """One completion of one token: the top-k of the next token at every position of ``ids`` (the last position's
    from the generated token's logprobs)."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": TOP_K}
    body.update(prompt_logprobs=TOP_K, return_tokens_as_token_ids=True)
    choice = server.post("/v1/completions", body)["choices"][0]
    prompt = [_top(entry) for entry in choice["prompt_logprobs"][1:]]
    return [*prompt, _top(choice["logprobs"]["top_logprobs"][0])]


def _perplexity(positions: list[dict[int, float]], ids: list[int]) -> float:
    """exp of the mean negative log-probability of each next token, from the server's entries (vLLM returns each
    prompt token's own log-probability beside the top-k)."""
    own = [top[token] for top, token in zip(positions, ids[1:])]
    return math.exp(-sum(own) / max(len(own), 1))


def compare_topk(
    reference: Any, runs: list[list[dict[int, float]]], heldout: list[dict[int, float]] | None = None
) -> tuple[list[SampleResult], list[float]]:
    """Each sample's metrics from the server's top-k at every position against the reference's full logits (each
    prompt with the reference's tokens, then the held-out text when ``heldout`` and the reference have it), and every
    log-probability difference (for the report's histogram)."""
    import torch

    from .judge import HELDOUT_SAMPLE, agreement, along

    rows = list(zip(reference.prompts, reference.input_ids, reference.logits, reference.greedy, runs))
    if heldout is not None and reference.heldout_logits is not None:
        rows.append((HELDOUT_SAMPLE, None, reference.heldout_logits, None, heldout))
    samples, differences = [], []
    for prompt, prompt_ids, logits, want, positions in rows:
        logp = logits.float().log_softmax(-1)
        diffs, kls, top1 = [], [], []
        for row, top in zip(logp, positions):
            ids = torch.tensor(list(top))
            got = torch.tensor(list(top.values()), dtype=torch.float32)
            ours = row[ids]
            diffs.append((got - ours).abs())
            p, q = ours.log_softmax(-1), got.log_softmax(-1)  # both renormalized on the shared support
            kls.append(float((p.exp() * (p - q)).sum()))
            top1.append(float(int(ids[got.argmax()]) == int(row.argmax())))
        every = torch.cat(diffs)
        differences += every.tolist()
        agree = None
        if want is not None:
            chosen = [max(top, key=top.get) for top in positions]
            agree = agreement(want, along(prompt_ids.numel() - 1, want, chosen))
        samples.append(
            SampleResult(
                prompt,
                float(every.max()),
                float(every.mean()),
                max(sum(kls) / len(kls), 0.0),
                sum(top1) / len(top1),
                agree,
            )
        )
    return samples, differences


def _histogram(differences: list[float], bins: int = 24) -> dict[str, list[float]]:
    import torch

    values = torch.tensor(differences, dtype=torch.float32)
    values = values[torch.isfinite(values)]
    top = (float(values.max()) if values.numel() else 0.0) or 1e-12
    counts = torch.histc(values, bins=bins, min=0.0, max=top)
    return {"edges": [top * i / bins for i in range(bins + 1)], "counts": counts.tolist()}


def served_serving(server: Any, model: str, tokenizer_dir: Path) -> dict[str, Any]:
    """The serving check in the server: its rendering of each conversation (``/tokenize`` with the messages, and the
    tools when the template takes them) against ``apply_chat_template`` token for token, and that it stops on the
    end-of-turn token."""
    from transformers import AutoTokenizer

    from .serving import Probes, _check

    runtime, stop_runtime = i18n.ui("serving_runtime_vllm"), i18n.ui("serving_runtime_vllm_stop")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tokenizer, "chat_template", None):
        return {"status": "not_run", "reason": i18n.ui("serving_no_chat_template"), "checks": []}
    probes = Probes.of(tokenizer)

    def render(conversation: list, tools: list | None) -> str:
        body = {"model": model, "messages": conversation, "add_generation_prompt": True}
        ids = server.post("/tokenize", {**body, **({"tools": tools} if tools else {})})["tokens"]
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
        same = ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if same else tokenizer.decode(ids, skip_special_tokens=False)

    checks = probes.compare(runtime, render)
    turn = probes.turn
    if turn is None:
        checks.append(_check(stop_runtime, "not_run", reason=i18n.ui("serving_no_turn")))
    else:
        prompt = tokenizer(probes.expected[0], add_special_tokens=False)["input_ids"]
        body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logit_bias": {str(turn[1]): 100}}
        choice = server.post("/v1/completions", {**body, "return_token_ids": True})["choices"][0]
        tokens = choice.get("token_ids") or []
        if choice["finish_reason"] == "stop" and tokens == [turn[1]]:
            checks.append(_check(stop_runtime, "verified", stop=turn[1]))
        else:
            checks.append(_check(stop_runtime, "failed", stop=turn[1], held=tokens))
    statuses = {c["status"] for c in checks}
    status = "failed" if "failed" in statuses else "not_run" if "not_run" in statuses else "verified"
    return {"status": status, "checks": checks, "end_of_turn": turn[0] if turn else None}


def verify_served(
    label: str,
    path: Path,
    reference: Any,
    bounds: Bounds,
    *,
    base_dir: Path,
    tokenizer_dir: Path,
    python: str,
    max_len: int,
    floor: str,
    log: Path,
) -> ArtifactVerdict:
    """Serve ``path`` (``label``: safetensors@vllm, adapter@vllm or peft@vllm) in vLLM, run the reference's inputs and
    the serving check through it, judge it on ``bounds`` and stop the server."""
    from ..runtimes.vllm import ServerFailed, vllm_problem

    lora, path = not label.startswith("safetensors@"), path.resolve()
    precision = precision_of(base_dir if lora else path)
    problem = vllm_problem(python)
    if problem is not None:
        return not_run(path, precision, problem)
    server, model = _server(label, path, base_dir, tokenizer_dir, python, max_len, log)
    try:
        with server:
            asked = (model, label, path, reference, tokenizer_dir)
            return judge_on_server(server, *asked, bounds=bounds, floor=floor, precision=precision, log=log)
    except ServerFailed as exc:
        return unserved(exc, server, path, precision, log)


def judge_on_server(
    server: Any,
    model: str,
    label: str,
    path: Path,
    reference: Any,
    tokenizer_dir: Path,
    *,
    bounds: Bounds,
    floor: str,
    precision: str,
    log: Path,
) -> ArtifactVerdict:
    """``model`` (the served model's name, or a LoRA's) in a running server: the reference's inputs, the held-out
    text and the serving check, then judged. Raises ServerFailed when the server fails on a request."""
    runs = [_ask(server, model, [int(i) for i in ids]) for ids in reference.sequences()]
    heldout = runs.pop() if reference.heldout_ids is not None else None
    serving = served_serving(server, model, tokenizer_dir)
    samples, differences = compare_topk(reference, runs, heldout)
    verdict = ArtifactVerdict(str(path), precision, "verified", "", samples, _histogram(differences))
    verdict.runtime = i18n.ui("vllm_runtime", version=server.version)
    verdict.server = server_record(server, log)
    if heldout is not None:
        verdict.perplexity = _perplexity(heldout, [int(i) for i in reference.heldout_ids])
    verdict.reference_perplexity = reference.heldout_perplexity
    verdict.serving = serving
    _judge(label, verdict, bounds, reference.precision, floor)
    return verdict


def _judge(label: str, verdict: ArtifactVerdict, bounds: Bounds, reference_precision: str, floor: str) -> None:
    """Judge a served artifact on its log-probabilities (judge reads ``verdict.server``) and its serving check, and
    log the verdict."""
    from .judge import serving_failure
    from .serving import serving_line

    verdict.failure = judge(verdict, bounds, reference_precision, floor) or serving_failure(verdict)
    verdict.rule_prefix = i18n.ui("vllm_rule", k=TOP_K)
    verdict.rule = verdict.rule_prefix + verdict.rule
    verdict.status = "verified" if verdict.failure is None else "failed"
    logger.info(
        i18n.ui(
            "verify_served_line",
            artifact=f"{label} ({verdict.artifact})",
            runtime=verdict.runtime,
            serving=serving_line(verdict.serving) or "",
            rule=verdict.rule,
            diff=verdict.max_abs_diff,
            kl=verdict.mean_kl,
            top1=verdict.top1_agreement,
            result="passed" if verdict.passed else "FAILED",
        )
    )


def unserved(exc: Any, server: Any, path: Path, precision: str, log: Path) -> ArtifactVerdict:
    """The verdict of a server that failed: not run when vLLM has no kernel for the artifact or could not start (the
    runtime's limit; vLLM's root cause quoted), failed when it refused the adapter or failed on a request."""
    from ..runtimes.vllm import root_cause, unsupported

    missing = unsupported(log)
    if missing is not None:
        verdict = not_run(path, precision, i18n.ui("vllm_no_kernel", reason=missing, log=log))
        verdict.server = server_record(server, log)
        return verdict
    if server.start_seconds is None and not exc.lora:  # the runtime could not start: nothing known of the artifact
        return not_run(path, precision, i18n.ui("vllm_not_started", reason=exc.reason, log=log))
    reason = exc.reason if server.start_seconds is None else f"{exc.reason} ({root_cause(log)})"
    verdict = ArtifactVerdict(str(path), precision, "failed", "vLLM", error=reason)
    verdict.runtime = i18n.ui("vllm_runtime", version=server.version or "?")
    verdict.server = server_record(server, log)
    verdict.failure = ValidationError("inference_failed", artifact=str(path), error=reason)
    return verdict


def server_record(server: Any, log: Path) -> dict[str, Any]:
    """What the report says of the server: the command a user would type, vLLM's version, its start time, the peak
    resident memory of its processes, and its log."""
    return {
        "command": " ".join(server.command),
        "version": server.version,
        "start_seconds": server.start_seconds,
        "peak_rss": server.peak_rss or None,
        "log": str(log),
    }

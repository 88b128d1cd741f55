"""The vLLM runtime's pieces that need no server: metrics on a server's top-k log-probabilities against torch's own
KL on the same support, and vLLM's root cause read from its log."""

from pathlib import Path

import torch

from model_export.runtimes.vllm import root_cause, unsupported
from model_export.verify.reference import Reference
from model_export.verify.served import compare_topk, lora_folder, served_targets


def _reference(logits: torch.Tensor, prompt: int = 4) -> Reference:
    """A reference whose prompt has ``prompt`` tokens and whose greedy tokens are its own choices after it
    (teacher-forced: its logits cover the prompt and every greedy token but the last)."""
    greedy = logits[prompt - 1 :].argmax(-1).tolist()
    return Reference(["p"], [torch.arange(prompt)], [logits], [greedy])


def _served(logits: torch.Tensor, k: int) -> list[dict[int, float]]:
    logp = logits.log_softmax(-1)
    top = logp.topk(k, -1)
    return [dict(zip(ids.tolist(), values.tolist())) for ids, values in zip(top.indices, top.values)]


def test_identical_logits_agree_on_every_metric():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    samples, diffs = compare_topk(_reference(logits), [_served(logits, 20)])
    (sample,) = samples
    assert sample.max_abs_diff < 1e-6 and sample.kl < 1e-9 and sample.top1_agreement == 1.0
    assert sample.greedy_agreement == 1.0 and len(diffs) == 6 * 20


def test_kl_is_torchs_on_the_shared_support_and_top1_follows_the_argmax():
    generator = torch.Generator().manual_seed(1)
    ours = torch.randn(5, 40, generator=generator)
    theirs = ours + 0.3 * torch.randn(5, 40, generator=generator)
    theirs[3] = ours[3].flip(-1)  # one position whose argmax differs: the second of three greedy tokens
    served = _served(theirs, 10)
    samples, _ = compare_topk(_reference(ours, prompt=3), [served])
    expected_kl, expected_diff = [], 0.0
    for row, top in zip(ours.log_softmax(-1), served):
        ids = torch.tensor(list(top))
        got = torch.tensor(list(top.values()))
        expected_diff = max(expected_diff, float((got - row[ids]).abs().max()))
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), row[ids].log_softmax(-1), log_target=True, reduction="sum")
        expected_kl.append(float(kl))
    (sample,) = samples
    assert abs(sample.kl - sum(expected_kl) / 5) < 1e-6 and abs(sample.max_abs_diff - expected_diff) < 1e-6
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean()
    assert abs(sample.top1_agreement - float(top1)) < 1e-6 and sample.top1_agreement < 1.0
    # along the reference's three tokens, vLLM's own choice agrees on the first and differs at the second: 1/3, even
    # where a later choice agrees again (after the first difference a free-running generation has gone its own way)
    assert abs(sample.greedy_agreement - 1 / 3) < 1e-9


# Lines as vLLM 0.32's CPU build wrote them for an int8 compressed-tensors checkpoint (shortened paths).
_NO_KERNEL = """\
(APIServer pid=1) WARNING 12-06 23:43:42 [system_utils.py:255] Found ulimit of 20000 and failed to automatically \
increase with error current limit exceeds maximum limit. This can cause fd limit errors like `OSError: [Errno 24] Too \
many open files`. Consider increasing with ulimit -n
(Worker pid=3) ERROR 12-06 23:45:45 [multiproc_executor.py:953] Traceback (most recent call last):
(Worker pid=3) ERROR 12-06 23:45:45 [multiproc_executor.py:953]   File "vllm/model_executor/kernels/linear/__init__.py"\
, line 930, in choose_mp_linear_kernel
(Worker pid=3) ERROR 12-06 23:45:45 [multiproc_executor.py:953]     raise ValueError(
(Worker pid=3) ERROR 12-06 23:45:45 [multiproc_executor.py:953] ValueError: Failed to find a kernel that can \
implement the WNA16 linear layer. Reasons:
(Worker pid=3) ERROR 12-06 23:45:45 [multiproc_executor.py:953]  CPUWNA16LinearKernel cannot implement due to: Quant \
type (uint8b128) not supported by CPUWNA16
(EngineCore pid=2) ERROR 12-06 23:45:47 [core.py:1510] EngineCore failed to start.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""


def test_the_root_cause_is_vllms_first_exception_with_its_reasons(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(_NO_KERNEL)
    cause = root_cause(log)
    assert cause == (
        "ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: "
        "CPUWNA16LinearKernel cannot implement due to: Quant type (uint8b128) not supported by CPUWNA16"
    )
    assert unsupported(log) == cause
    log.write_text(_NO_KERNEL.replace("ValueError: Failed to find a kernel", "ValueError: Bad config"))
    assert unsupported(log) is None and root_cause(log).startswith("ValueError: Bad config")


def test_vllm_verifies_the_safetensors_artifact_and_the_adapter_in_a_run_and_a_batch_serves_its_adapters():
    checkpoint = Path("run/checkpoint-30")
    assert served_targets({"safetensors": "s", "onnx": "o"}, checkpoint, ["vllm"]) == [
        ("safetensors@vllm", Path("s")),
        ("adapter@vllm", checkpoint),
    ]
    # in a batch the adapters are served together once every run is done (pipeline/batch_served.py)
    assert served_targets({"safetensors": "s", "peft": "p"}, checkpoint, ["vllm"], in_batch=True) == [
        ("safetensors@vllm", Path("s"))
    ]
    assert served_targets({"safetensors": "s"}, checkpoint, []) == []
    assert lora_folder({"peft": "p"}, checkpoint) == Path("p") and lora_folder({}, checkpoint) == checkpoint

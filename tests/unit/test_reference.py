"""Whole-model loading for reference runs: settings from the configuration, CUDA out-of-memory explained."""

import pytest
import torch

from model_export import ExportConfiguration, MissingDependencyError, ResourceError
from model_export.checkpoint.loading import cuda_oom_as_resource_error, load_model


def test_cuda_out_of_memory_becomes_the_guides_error():
    with pytest.raises(ResourceError) as err:
        with cuda_oom_as_resource_error():
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.6 GiB"
            )
    assert err.value.code == "ME401" and str(err.value) == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, MemoryError)
    assert "base_model_load_in_4bit: true" in err.value.hint() and "device_map: cpu" in err.value.hint()


def test_load_model_on_the_cpu(tiny_base):
    model = load_model(str(tiny_base), ExportConfiguration(device_map="cpu"))
    assert next(model.parameters()).device.type == "cpu"


def test_4bit_without_bitsandbytes_names_the_extra(tiny_base, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed (the dev extra installs it)
    with pytest.raises(MissingDependencyError) as err:
        load_model(str(tiny_base), ExportConfiguration(base_model_load_in_4bit=True, device_map="cpu"))
    assert "pip install 'model-export[gpu]'" in err.value.hint()


# ---- device_map, CUDA out-of-memory fallback, bitsandbytes: on the CPU with torch's CUDA calls stood in for ----


def _pretend_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_device_map_resolves_and_cuda_without_a_gpu_is_explained(monkeypatch):
    import torch

    from model_export.checkpoint.loading import resolve_device
    from model_export.errors import ResourceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu"
    with pytest.raises(ResourceError) as err:
        resolve_device("cuda")
    assert err.value.code == "ME405" and "device_map is cuda, but there is no GPU to use" in str(err.value)
    _pretend_cuda(monkeypatch)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


def test_a_cuda_out_of_memory_falls_back_to_the_cpu_under_auto_and_stops_under_cuda(monkeypatch, caplog):
    import torch

    from model_export.checkpoint.loading import on_device
    from model_export.errors import ResourceError

    _pretend_cuda(monkeypatch)
    calls = []

    def work(device):
        calls.append(device)
        if device == "cuda":
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB"
            )
        return "done on " + device

    with caplog.at_level("WARNING", logger="model_export"):
        assert on_device("auto", work, what="computing the reference") == "done on cpu"
    assert calls == ["cuda", "cpu"]
    assert (
        "CUDA out of memory while computing the reference (Tried to allocate 2.00 GiB): falling back to the CPU"
        in caplog.text
    )
    with pytest.raises(ResourceError) as err:
        on_device("cuda", work, what="computing the reference")
    assert err.value.code == "ME401" and str(err.value).startswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert on_device("cpu", work, what="x") == "done on cpu"


def test_the_reference_falls_back_to_the_cpu_and_equals_the_cpu_reference(tiny_base, adapter, monkeypatch, caplog):
    """The whole reference computation, with the GPU load failing for lack of memory: the CPU result, identical."""
    import torch

    import model_export.checkpoint.loading as reference
    from model_export.verify.reference import compute_reference

    cpu = compute_reference(tiny_base, adapter, tiny_base, ["Hello"], 4, device_map="cpu")
    real = reference.load_model

    really_available = torch.cuda.is_available

    def load(name, config=None, *, device_map=None, **kwargs):
        if device_map == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        monkeypatch.setattr(torch.cuda, "is_available", really_available)  # the CPU load asks torch for real
        return real(name, config, device_map=device_map, **kwargs)

    _pretend_cuda(monkeypatch)
    monkeypatch.setattr(reference, "load_model", load)
    with caplog.at_level("WARNING", logger="model_export"):
        fallen = compute_reference(tiny_base, adapter, tiny_base, ["Hello"], 4, device_map="auto", load_in_4bit=True)
    assert "falling back to the CPU" in caplog.text and "base_model_load_in_4bit needs a CUDA GPU" in caplog.text
    assert (fallen.device, fallen.precision) == ("cpu", "full")  # on the CPU bitsandbytes is not used: full precision
    # the CPU reference here is layer-streamed (its sequences packed in one pass), the fallen one PEFT's whole model
    assert float((fallen.logits[0] - cpu.logits[0]).abs().max()) <= 1e-5 and fallen.greedy == cpu.greedy


def test_a_4bit_reference_holds_every_artifact_to_the_4bit_bounds():
    from model_export.verify.judge import ArtifactVerdict, Bounds, SampleResult, judge

    fp32 = ArtifactVerdict("a", "full", True, "", [SampleResult("p", 0.8, 0.1, 0.07, 0.88, 1.0)])
    assert judge(fp32, Bounds()).code == "ME601"  # against a full-precision reference: 0.8 > 1e-3
    assert judge(fp32, Bounds(), "int4") is None and fp32.rule == "top-1 >= 0.85, KL <= 0.1 (reference in 4-bit)"
    assert judge(fp32, Bounds(), "reduced").code == "ME603" and fp32.rule.endswith("(reference in 8-bit)")


# ---- the same paths on a real GPU (the device run in docs/benchmarks.md); skipped without CUDA ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_the_reference_on_the_gpu_equals_the_cpu_reference(tiny_base, adapter):
    import torch

    from model_export.verify.reference import compute_reference

    cpu = compute_reference(tiny_base, adapter, tiny_base, ["Hello", "简单测试"], 6, device_map="cpu")
    gpu = compute_reference(tiny_base, adapter, tiny_base, ["Hello", "简单测试"], 6, device_map="cuda")
    assert gpu.device == "cuda" and gpu.precision == "full"
    for a, b in zip(cpu.logits, gpu.logits):
        assert torch.allclose(a, b, atol=1e-4)
    assert gpu.greedy == cpu.greedy


@pytest.mark.gpu
@cuda
def test_a_real_cuda_out_of_memory_falls_back_under_auto(caplog):
    import torch

    from model_export.checkpoint.loading import on_device
    from model_export.errors import ResourceError

    def work(device):
        total = torch.cuda.get_device_properties(0).total_memory
        return torch.empty(2 * total, dtype=torch.uint8, device=device).numel() if device == "cuda" else "cpu"

    with caplog.at_level("WARNING", logger="model_export"):
        assert on_device("auto", work, what="x") == "cpu"
    assert "CUDA out of memory while x" in caplog.text
    with pytest.raises(ResourceError) as err:
        on_device("cuda", work, what="x")
    assert err.value.code == "ME401"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_reference_on_the_gpu(tiny_base, adapter, bits):
    pytest.importorskip("bitsandbytes")
    from model_export.verify.reference import compute_reference

    full = compute_reference(tiny_base, adapter, tiny_base, ["Hello"], 4, device_map="cuda")
    quantized = compute_reference(
        tiny_base, adapter, tiny_base, ["Hello"], 4, device_map="cuda", load_in_4bit=bits == 4, load_in_8bit=bits == 8
    )
    assert quantized.precision == ("int4" if bits == 4 else "reduced") and quantized.device == "cuda"
    diff = (quantized.logits[0] - full.logits[0]).abs()
    assert 0 < float(diff.max()) < 5.0  # quantized, so not equal; the same model, so close


def test_an_out_of_memory_while_verifying_is_the_machines_fault_not_the_artifacts(
    tiny_base, adapter, monkeypatch, caplog
):
    """Under device_map cuda it stops the run as ME401 (not 'inference failed'); under auto the artifact runs on the
    CPU."""
    import transformers

    from model_export.verify.artifacts import verify_artifact
    from model_export.verify.reference import compute_reference

    reference = compute_reference(tiny_base, adapter, tiny_base, ["Hello"], 2, device_map="cpu")
    real = transformers.AutoModelForCausalLM.from_pretrained
    really_available = torch.cuda.is_available

    def load(path, *args, device_map=None, **kwargs):
        if device_map == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        monkeypatch.setattr(torch.cuda, "is_available", really_available)
        return real(path, *args, device_map=device_map, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    _pretend_cuda(monkeypatch)
    with pytest.raises(ResourceError) as err:
        verify_artifact(tiny_base, reference, device_map="cuda", raise_on_failure=False)
    assert err.value.code == "ME401"
    _pretend_cuda(monkeypatch)
    with caplog.at_level("WARNING", logger="model_export"):
        verdict = verify_artifact(tiny_base, reference, device_map="auto", raise_on_failure=False)
    assert verdict.error is None and "falling back to the CPU" in caplog.text

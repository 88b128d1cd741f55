"""Whole-model loading for reference runs: settings from the configuration, CUDA out-of-memory explained."""

import pytest
import torch

from model_export import ExportConfiguration, MissingDependencyError, ResourceError
from model_export.reference import cuda_oom_as_resource_error, load_model


def test_cuda_out_of_memory_becomes_the_guides_error():
    with pytest.raises(ResourceError) as err:
        with cuda_oom_as_resource_error():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.6 GiB")
    assert err.value.code == "ME401" and str(err.value) == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, MemoryError)
    assert "base_model_load_in_4bit: true" in err.value.hint() and "device_map: cpu" in err.value.hint()


def test_load_model_on_the_cpu(tiny_base):
    model = load_model(str(tiny_base), ExportConfiguration(device_map="cpu"))
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_4bit_without_bitsandbytes_names_the_extra(tiny_base):
    with pytest.raises(MissingDependencyError) as err:
        load_model(str(tiny_base), ExportConfiguration(base_model_load_in_4bit=True, device_map="cpu"))
    assert "pip install 'model-export[gpu]'" in err.value.hint()

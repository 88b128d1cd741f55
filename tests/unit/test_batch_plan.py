"""Planning a batch (batch.py): which folders are adapters, their names, how many run at once, the config rules."""

import json
import math

import pytest

from model_export import ConfigError, ExportConfiguration
from model_export.errors import CheckpointValidationError
from model_export.pipeline.batch import find_adapters, is_batch, pool_width
from model_export.pipeline.preflight import GIB, memory_before_verify, memory_per_adapter
from model_export.pipeline.validate import validate_config


def adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    return folder


def trainer_run(folder, steps=(10, 20)):
    for step in steps:
        adapter(folder / f"checkpoint-{step}")
    return folder


def config(tmp_path, **settings):
    return ExportConfiguration(output_dir=str(tmp_path / "out"), **settings)


def test_a_sweep_folder_a_glob_a_list_and_a_mapping(tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("lr-1e-3", "lr-3e-3"):
        trainer_run(sweep / name)
    (sweep / "notes").mkdir()  # neither a run nor an adapter: not part of the sweep
    single = trainer_run(tmp_path / "single")
    assert not is_batch(config(tmp_path, checkpoint_path=str(single)))
    assert is_batch(config(tmp_path, checkpoint_path=str(sweep)))
    assert [a.name for a in find_adapters(config(tmp_path, checkpoint_path=str(sweep)))] == ["lr-1e-3", "lr-3e-3"]
    globbed = config(tmp_path, checkpoint_path=str(sweep / "lr-*"))
    assert is_batch(globbed) and [a.name for a in find_adapters(globbed)] == ["lr-1e-3", "lr-3e-3"]
    listed = config(
        tmp_path, adapters=[str(single / "checkpoint-20"), str(sweep), str(sweep / "lr-1e-3")]
    )  # the last is already in the sweep: one adapter, not two
    assert [a.name for a in find_adapters(listed)] == ["single-checkpoint-20", "lr-1e-3", "lr-3e-3"]
    named = config(tmp_path, adapters={"support": str(single), "sales": str(sweep / "lr-1e-3")})
    assert [(a.name, a.path) for a in find_adapters(named)] == [
        ("support", str(single)),
        ("sales", str(sweep / "lr-1e-3")),
    ]


def test_names_that_collide_or_are_reserved_are_all_reported(tmp_path):
    a, b = trainer_run(tmp_path / "x" / "run"), trainer_run(tmp_path / "y" / "RUN")
    base = trainer_run(tmp_path / "base")
    with pytest.raises(ConfigError) as caught:
        find_adapters(config(tmp_path, adapters=[str(a), str(b), str(base)]))
    message = str(caught.value)
    assert caught.value.code == "ME111" and "'base'" in message and str(a) in message and str(b) in message
    with pytest.raises(ConfigError) as caught:
        find_adapters(config(tmp_path, adapters={"a/b": str(a)}))
    assert "'a/b'" in str(caught.value)


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(CheckpointValidationError) as caught:
        find_adapters(config(tmp_path, adapters=[str(tmp_path / "nowhere")]))
    assert caught.value.code == "ME201"
    with pytest.raises(ConfigError) as caught:
        find_adapters(config(tmp_path, adapters=[str(tmp_path / "runs-*")]))
    assert caught.value.code == "ME112" and "runs-*" in str(caught.value)


def test_the_pool_width_follows_memory_cores_and_the_limit(monkeypatch):
    import psutil

    class Memory:
        available = 9 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert pool_width(10, 2 * 2**30)[:2] == (4, 2)  # (9 - 1) GiB / 2 GiB = 4 processes, 8 cores / 4 = 2 threads
    assert pool_width(10, 1 * 2**30)[:2] == (8, 1)  # the cores bound it
    assert pool_width(3, 1 * 2**30)[:2] == (3, 2)  # the adapters bound it
    width, threads, rule = pool_width(10, 1 * 2**30, limit=2)
    assert (width, threads) == (2, 4) and "max_parallel_adapters 2" in rule and "cores 8" in rule
    assert pool_width(10, 20 * 2**30)[:2] == (1, 8)  # one at a time even when one does not fit: it may still run


def test_the_memory_planned_per_adapter_grows_with_the_base_and_the_formats(tmp_path):
    small = memory_per_adapter(config(tmp_path, export_formats=["safetensors"]), 2 * 10**9)
    whole = memory_per_adapter(
        config(tmp_path, export_formats=["safetensors"], verification_runtime="transformers"), 2 * 10**9
    )
    assert 2 * 10**9 < small < whole and whole >= 8 * 10**9  # the fp32 model twice when loaded whole


def test_what_a_run_holds_beside_its_reference_is_planned_without_the_verify_step(tmp_path):
    """The reference beside a run shares memory with the merge, calibration and export only (the verify step waits
    for its process to end): planned from two of the largest tensor or decoder layer in fp32, not from the verify
    step's runtimes; the ONNX export's torch backend instantiates the whole model, so it plans that. The streamed
    reference beside it is planned the same way (what it keeps resident comes on top, within max_memory)."""
    from safetensors import safe_open

    from model_export.checkpoint.base_model import inspect_base_model
    from model_export.demo.tiny import build_base_model
    from model_export.pipeline.beside import _needs

    base = build_base_model(tmp_path / "base", hidden_size=256, num_hidden_layers=4, tie_word_embeddings=False)
    info = inspect_base_model(str(base))
    sizes = {}  # each decoder layer's parameters together, every other tensor alone
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for name in f.keys():
            key = ".".join(name.split(".")[:3]) if ".layers." in name else name
            sizes[key] = sizes.get(key, 0) + math.prod(f.get_slice(name).get_shape())
    assert len(sizes) == 4 + 3  # four layers; the embedding, the untied head and the final norm
    params = sum(sizes.values())

    plain = config(tmp_path, export_formats=["safetensors", "gguf"], quantization_level="int8")
    assert memory_before_verify(plain, info) == int(0.6 * GIB + 8 * max(sizes.values()))
    # the layer-streamed reference itself: two layers in fp32 beside what it keeps resident; loaded whole, fp32 twice
    assert _needs(plain, info) == (memory_before_verify(plain, info), memory_before_verify(plain, info))
    whole_reference = plain.model_copy(update={"verification_runtime": "transformers"})
    assert _needs(whole_reference, info)[0] == int(0.6 * GIB + 4 * info.weight_bytes)
    assert memory_before_verify(whole_reference, info) == memory_before_verify(plain, info)  # its runtime: later
    assert memory_before_verify(plain, info) < memory_per_adapter(whole_reference, info.weight_bytes)
    torch_onnx = config(tmp_path, export_formats=["onnx"], onnx_backend="torch", onnx_optimize_graph=False)
    assert memory_before_verify(torch_onnx, info) == int(0.6 * GIB + 4 * params)


def test_batch_keys_are_checked(tmp_path):
    problems = validate_config(config(tmp_path, batch_outputs="adapters", export_formats=["pytorch", "gguf"]))
    assert [p.key for p in problems] == ["batch_outputs"] and "pytorch" in problems[0].message()
    # onnx has its adapters on a base graph (an .onnx_adapter each); onnx_adapter alone needs onnx
    accepted = validate_config(config(tmp_path, batch_outputs="adapters", export_formats=["onnx", "gguf"]))
    assert "batch_outputs" not in [p.key for p in accepted]
    problems = validate_config(config(tmp_path, export_formats=["gguf"], onnx_adapter=True))
    assert [p.key for p in problems] == ["onnx_adapter"] and "export_formats has no onnx" in problems[0].message()
    # onnxruntime-genai appends a whole prompt: a base graph fixed at one token per call could not take one
    for settings in ({"onnx_adapter": True}, {"batch_outputs": "both"}):
        problems = validate_config(config(tmp_path, export_formats=["onnx"], onnx_dynamic_axes=None, **settings))
        assert [p.key for p in problems] == ["onnx_dynamic_axes"] and "whole prompt" in problems[0].message()
    merged = validate_config(config(tmp_path, export_formats=["onnx"], onnx_dynamic_axes=None))
    assert "onnx_dynamic_axes" not in [p.key for p in merged]  # onnxruntime runs a merged graph a token at a time


def test_a_ray_cluster_that_cannot_be_reached_is_explained(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from model_export.errors import ResourceError
    from model_export.pipeline.batch import _ray

    def refuse(**options):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ResourceError) as caught:
        _ray([], 2**30, lambda task, line: None)
    assert caught.value.code == "ME409" and "10.0.0.5:6379" in str(caught.value)
    assert "RAY_AUTH_MODE=token" in caught.value.hint()


def test_runtimes_take_the_share_of_the_cores_a_batch_gives_them(monkeypatch):
    from model_export.runtimes.base import THREADS_ENV, threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert threads() == 8
    monkeypatch.setenv(THREADS_ENV, "2")
    assert threads() == 2
    monkeypatch.setenv(THREADS_ENV, "none")
    assert threads() == 8


def test_max_memory_auto_keeps_a_large_base_within_the_run_s_plan(tmp_path, monkeypatch):
    """With max_memory auto a base whose widened weights take more than a quarter of the available memory is kept only
    as far as the run's plan allows (memory_per_adapter, what a pool is sized by): in the verify step at most the plan
    less the reference's own process and streaming; beside the export, less what the export holds too (at the 4B shape
    on this machine's 24 GiB: nothing). A smaller base is limited by the available memory alone. A size keeps its
    meaning; the share a batch or the run gave the reference's process (RESIDENT_ENV) is taken as given."""
    from types import SimpleNamespace

    import psutil

    from model_export.checkpoint.base_model import inspect_base_model
    from model_export.demo.tiny import build_base_model
    from model_export.monitoring import RESIDENT_ENV
    from model_export.pipeline.beside import _needs, resident_beside
    from model_export.pipeline.preflight import resident_cap
    from model_export.verify.reference import memory_budget

    memory = SimpleNamespace(available=24 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.delenv(RESIDENT_ENV, raising=False)
    plain = config(tmp_path, export_formats=["safetensors", "gguf"], quantization_level="int8")
    base = build_base_model(tmp_path / "base", hidden_size=256, num_hidden_layers=4, tie_word_embeddings=False)
    layers = {f"model.layers.{k}.mlp.{p}.weight": SimpleNamespace(numel=2560 * 9728) for k in range(36) for p in "ab"}
    shape_4b = SimpleNamespace(  # the 4B shape's decoder layers and tied embedding, bf16 (headers only)
        tensors={"model.embed_tokens.weight": SimpleNamespace(numel=151936 * 2560), **layers},
        weight_bytes=2 * (151936 * 2560 + 72 * 2560 * 9728),
        path=base,
    )
    plan, reference = memory_per_adapter(plain, shape_4b.weight_bytes), _needs(plain, shape_4b)[0]
    cap = resident_cap(plain, shape_4b)
    assert reference + cap == plan  # the verify step's reference fills the plan, no more
    assert memory_budget("auto", cap) == cap < memory_budget("auto")  # the free memory alone would allow more
    assert resident_beside(plain, shape_4b) == 0 < cap  # beside the export: the plan is spent
    small = inspect_base_model(str(base))
    assert resident_cap(plain, small) is None
    assert resident_beside(plain, small) == int(memory.available - GIB - sum(_needs(plain, small)))
    memory.available = 1 << 40  # on a machine with 1 TiB free the 4B shape is small too
    assert resident_cap(plain, shape_4b) is None
    assert memory_budget("6GiB", 0) == 6 * GIB and memory_budget(0, 10**9) == 0
    monkeypatch.setenv(RESIDENT_ENV, "12345")
    assert memory_budget("auto", 0) == 12345


def _pool_probe(_task=None) -> tuple[bool, bool, int]:
    import os
    import sys

    return "torch" in sys.modules, "transformers.models.qwen3.modeling_qwen3" in sys.modules, os.getppid()


def _collector_probe(_task) -> tuple[int, int]:
    """(objects frozen out of the collector's reach, objects it still tracks) in a pool task."""
    import gc

    return gc.get_freeze_count(), len(gc.get_objects())


def test_the_pool_s_processes_start_with_torch_and_the_base_s_modelling_imported():
    """The local pool's processes fork from a server that imported torch, transformers and the base's modelling
    module once (pipeline/pool.py), so an adapter's process does not import them again; a task runs with what the
    process inherited frozen out of the collector's reach (gc.collect does not walk torch's and transformers'
    objects); leaving the server ends it."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    import psutil

    from model_export.pipeline import pool

    with pool.server("qwen3") as context:
        with ProcessPoolExecutor(1, mp_context=context) as executor:
            torch_there, modelling_there, parent = executor.submit(_pool_probe).result()
            probe = executor.submit(pool.task_in_batch_env, dict(os.environ), os.getcwd(), _collector_probe, 0)
            frozen, tracked = probe.result()
        assert torch_there and modelling_there and parent != os.getpid()  # forked from the server, not from us
        assert "forkserver" in " ".join(psutil.Process(parent).cmdline())
        assert frozen > 10 * tracked, (frozen, tracked)
    assert not psutil.pid_exists(parent) or psutil.Process(parent).status() == psutil.STATUS_ZOMBIE

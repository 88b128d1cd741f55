"""Every key of ExportConfiguration changes something a test observes (issue 13): a key that is accepted and does
nothing is a promise broken. KEY_EFFECTS names, for each key, the test that sets it and checks what it changes; the
meta-test below fails when a key is added without one, or when the named test no longer mentions its key."""

import ast
from pathlib import Path

import pytest

from model_export import ExportConfiguration

TESTS = Path(__file__).parents[1]

KEY_EFFECTS = {
    "checkpoint_path": "unit/test_cli.py::test_check_takes_its_settings_from_a_config_file",
    "checkpoint_selection": "unit/test_cli.py::test_check_takes_its_settings_from_a_config_file",
    "base_model_name": "unit/test_cli.py::test_check_takes_its_settings_from_a_config_file",
    "adapters": "integration/test_batch.py::test_names_that_collide_stop_before_anything_is_written",
    "batch_outputs": "integration/test_batch.py::test_names_that_collide_stop_before_anything_is_written",
    "executor": "integration/test_batch.py::test_ray_gives_the_same_artifacts_as_the_local_pool",
    "max_parallel_adapters": "integration/test_batch.py::test_a_bad_adapter_fails_alone_and_the_exit_code_says_so",
    "base_model_load_in_4bit": "unit/test_reference.py::test_4bit_without_bitsandbytes_names_the_extra",
    "base_model_load_in_8bit": "unit/test_config_validator.py::test_4bit_and_8bit_together",
    "device_map": "integration/test_pipeline.py::test_device_map_cuda_without_a_gpu_stops_before_anything_is_written",
    "batch_size": "integration/test_first_contact.py::test_log_level_debug_logs_debug_lines_and_info_does_not",
    "max_sequence_length": "integration/test_first_contact.py::test_max_sequence_length_cuts_a_long_prompt_instead_of_failing_in_onnxruntime",
    "use_memory_mapping": "integration/test_first_contact.py::test_use_memory_mapping_decides_how_transformers_reads_the_weights",
    "output_dir": "integration/test_first_contact.py::test_a_bf16_base_with_default_settings_verifies_every_artifact_it_ran",
    "export_formats": "integration/test_first_contact.py::test_a_bf16_base_with_default_settings_verifies_every_artifact_it_ran",
    "export_onnx": "unit/test_keys.py::test_export_onnx_adds_or_removes_onnx",
    "max_shard_size": "integration/test_pipeline.py::test_rerun_skips_and_a_changed_setting_reruns_what_follows",
    "quantization_level": "integration/test_pipeline.py::test_the_demo_at_int4_verifies_every_artifact_on_the_int4_bounds",
    "calibration_data": "integration/test_calibrated_gguf.py::test_calibration_samples_and_length_decide_the_tokens_the_imatrix_sees",
    "quantization_method": "integration/test_calibrated_gguf.py::test_demo_int4_safetensors_by_gptq_loads_in_transformers_and_verifies",
    "quantization_keep_modules": "integration/test_calibrated_gguf.py::test_quantization_keep_modules_keeps_them_in_every_format",
    "quantization_symmetric": "integration/test_calibrated_gguf.py::test_quantization_symmetric_decides_zero_points",
    "quantization_group_size": "integration/test_calibrated_gguf.py::test_quantization_group_size_sets_the_int4_groups",
    "gptq_act_order": "integration/test_calibrated_gguf.py::test_demo_int4_safetensors_by_gptq_loads_in_transformers_and_verifies",
    "calibration_samples": "integration/test_calibrated_gguf.py::test_calibration_samples_and_length_decide_the_tokens_the_imatrix_sees",
    "calibration_sequence_length": "integration/test_calibrated_gguf.py::test_calibration_samples_and_length_decide_the_tokens_the_imatrix_sees",
    "compress_weights": "unit/test_model_merger.py::test_dtype_options_and_compress_weights",
    "remove_training_artifacts": "unit/test_model_merger.py::test_training_artifacts_stay_out_unless_asked",
    "onnx_backend": "unit/test_onnx_export.py::test_an_unknown_architecture_is_refused_by_the_builder_and_taken_by_auto",
    "onnx_opset_version": "unit/test_onnx_export.py::test_an_opset_too_low_for_the_backend_is_a_config_error",
    "onnx_optimize_graph": "integration/test_pipeline.py::test_onnx_in_the_pipeline_both_graphs_verified_in_onnxruntime",
    "onnx_block_size": "unit/test_keys.py::test_onnx_block_size_and_accuracy_level_reach_the_graph",
    "onnx_accuracy_level": "unit/test_keys.py::test_onnx_block_size_and_accuracy_level_reach_the_graph",
    "gguf_type": "unit/test_keys.py::test_gguf_type_overrides_the_level",
    "gguf_output_type": "unit/test_kquants.py::test_output_and_token_embedding_types_as_llama_quantize_sets_them",
    "gguf_token_embedding_type": "unit/test_kquants.py::test_output_and_token_embedding_types_as_llama_quantize_sets_them",
    "gguf_lora_adapter": "integration/test_pipeline.py::test_gguf_in_the_pipeline_is_read_back_and_reported",
    "onnx_adapter": "integration/test_onnx_adapters.py::test_a_single_run_with_onnx_adapter_ships_the_adapter_on_its_base_graph",
    "onnx_dynamic_axes": "unit/test_onnx_export.py::test_exporter_failures_become_the_guides_errors",
    "run_validation_tests": "integration/test_pipeline.py::test_housekeeping_settings",
    "validation_tolerance": "integration/test_pipeline.py::test_a_broken_artifact_fails_verification_with_the_guides_message",
    "validation_min_top1": "unit/test_keys.py::test_reduced_precision_bounds_decide_the_verdict",
    "validation_max_kl": "unit/test_keys.py::test_reduced_precision_bounds_decide_the_verdict",
    "validation_int4_min_top1": "integration/test_pipeline.py::test_the_demo_at_int4_verifies_every_artifact_on_the_int4_bounds",
    "validation_int4_max_kl": "integration/test_pipeline.py::test_the_demo_at_int4_verifies_every_artifact_on_the_int4_bounds",
    "base_model_quantization": "integration/test_qlora.py::test_a_16bit_base_with_the_training_quantization_stated_merges_as_the_quantized_base_does",
    "merge_into": "integration/test_qlora.py::test_merge_into_original_on_a_quantized_base_says_the_16bit_weights_are_not_there",
    "verification_servers": "integration/test_serving.py::test_without_vllm_its_units_are_not_run_and_say_how_to_get_it",
    "vllm_python": "integration/test_serving.py::test_without_vllm_its_units_are_not_run_and_say_how_to_get_it",
    "verification_runtime": "integration/test_first_contact.py::test_verification_runtime_streams_the_reference_or_loads_it_whole",
    "max_memory": "unit/test_teacher_forced.py::test_max_memory_keeps_the_references_layers_and_changes_nothing_else",
    "validation_new_tokens": "integration/test_pipeline.py::test_rerun_skips_and_a_changed_setting_reruns_what_follows",
    "test_input_samples": "integration/test_first_contact.py::test_max_sequence_length_cuts_a_long_prompt_instead_of_failing_in_onnxruntime",
    "run_benchmarks": "integration/test_pipeline.py::test_benchmark_step_and_command_compare_every_artifact",
    "benchmark_new_tokens": "integration/test_pipeline.py::test_benchmark_step_and_command_compare_every_artifact",
    "benchmark_repeats": "integration/test_pipeline.py::test_benchmark_step_and_command_compare_every_artifact",
    "log_level": "integration/test_first_contact.py::test_log_level_debug_logs_debug_lines_and_info_does_not",
    "log_file": "unit/test_cli.py::test_check_takes_its_settings_from_a_config_file",
    "enable_progress_monitoring": "unit/test_cli.py::test_check_takes_its_settings_from_a_config_file",
    "memory_monitoring": "integration/test_pipeline.py::test_housekeeping_settings",
    "memory_monitoring_interval": "unit/test_keys.py::test_memory_monitoring_interval_spaces_the_lines",
    "steps_side_by_side": "integration/test_units.py::test_the_reference_beside_the_export_gives_the_same_verdicts",
    "cleanup_temp_files": "integration/test_first_contact.py::test_cleanup_temp_files_decides_what_a_failed_step_leaves",
    "save_intermediate_results": "integration/test_first_contact.py::test_save_intermediate_results_keeps_every_run_output_even_on_failure_and_is_part_of_the_key",
    "lang": "unit/test_cli.py::test_check_takes_its_settings_from_a_config_file",
}


def _test_source(node_id: str) -> str:
    path, name = node_id.split("::")
    source = (TESTS / path).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    raise AssertionError(f"{node_id} does not exist")


def test_every_key_has_a_test_that_observes_its_effect():
    assert set(KEY_EFFECTS) == set(ExportConfiguration.model_fields), "name the test that observes each new key"
    for key, node_id in KEY_EFFECTS.items():
        assert key in _test_source(node_id), f"{node_id} does not set {key}"


def test_export_onnx_adds_or_removes_onnx():
    assert ExportConfiguration(export_onnx=True).formats == ["safetensors", "onnx"]
    assert ExportConfiguration(export_formats=["onnx", "gguf"], export_onnx=False).formats == ["gguf"]
    assert ExportConfiguration(export_formats=["onnx"]).formats == ["onnx"]


def test_reduced_precision_bounds_decide_the_verdict():
    from model_export.verify.judge import ArtifactVerdict, Bounds, SampleResult, judge

    def verdict():
        return ArtifactVerdict("a", "reduced", "verified", "", [SampleResult("p", 0.5, 0.01, 0.02, 0.95, 1.0)])

    loose = Bounds.from_config(ExportConfiguration())
    assert judge(verdict(), loose) is None
    strict_top1 = Bounds.from_config(ExportConfiguration(validation_min_top1=0.99))
    assert judge(verdict(), strict_top1).code == "ME603"
    strict_kl = Bounds.from_config(ExportConfiguration(validation_max_kl=0.01))
    assert judge(verdict(), strict_kl).code == "ME601"


def test_onnx_block_size_and_accuracy_level_reach_the_graph(adapter, tiny_base, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from model_export import run

    seen = {}
    for block, accuracy in ((16, 0), (64, 4)):
        out = tmp_path / f"b{block}"
        run(
            ExportConfiguration(
                checkpoint_path=str(adapter),
                base_model_name=str(tiny_base),
                output_dir=str(out),
                export_formats=["onnx"],
                quantization_level="int4",
                onnx_optimize_graph=False,
                run_validation_tests=False,
                onnx_block_size=block,
                onnx_accuracy_level=accuracy,
            )
        )
        graph = onnx.load(str(out / "export" / "onnx" / "model.onnx"), load_external_data=False).graph
        attributes = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]
        seen[block] = ({a["block_size"] for a in attributes}, {a.get("accuracy_level", 0) for a in attributes})
    assert seen == {16: ({16}, {0}), 64: ({64}, {4})}


def test_gguf_type_overrides_the_level(adapter, tiny_base, tmp_path):
    pytest.importorskip("gguf")
    from model_export import run

    names = {}
    for gguf_type in ("auto", "q5_1"):
        out = tmp_path / gguf_type
        run(
            ExportConfiguration(
                checkpoint_path=str(adapter),
                base_model_name=str(tiny_base),
                output_dir=str(out),
                export_formats=["gguf"],
                quantization_level="int8",
                gguf_type=gguf_type,
                run_validation_tests=False,
            )
        )
        names[gguf_type] = sorted(p.name for p in (out / "export" / "gguf").glob("*.gguf"))
    assert names == {"auto": ["model-q8_0.gguf"], "q5_1": ["model-q5_1.gguf"]}


def test_memory_monitoring_interval_spaces_the_lines():
    """memory_monitoring_interval: seconds between the Memory usage lines (ExportConfiguration feeds MemoryMonitor)."""
    import logging
    import time

    from model_export.monitoring import MemoryMonitor, logger

    def lines(interval):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        level, logger.level = logger.level, logging.INFO
        try:
            with MemoryMonitor(interval=interval, enabled=True, sample_every=0.02):
                time.sleep(0.55)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        return sum("Memory usage" in r.getMessage() for r in records)

    slow, fast = lines(10), lines(0.1)
    assert slow == 2 and fast >= slow + 3  # the lines at start and end, and one every interval between

"""Property tests (hypothesis): hostile bytes, configs and directory trees only ever give the tool's own errors."""

import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model_export import CheckpointValidationError, ConfigError, validate_config
from model_export.checkpoint.detect import detect
from model_export.tensor_io import SafetensorsFormatError, read_header

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F64", "X9"])
ENTRY = st.fixed_dictionaries(
    {
        "dtype": DTYPES,
        "shape": st.lists(st.integers(-2, 6), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 400), min_size=0, max_size=3),
    }
)


@FAST
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=8), ENTRY, max_size=4),
    data=st.binary(max_size=300),
    declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_any_safetensors_header_is_read_or_refused_with_a_format_error(tmp_path_factory, header, data, declared):
    raw = json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    try:
        parsed = read_header(path)
    except SafetensorsFormatError:
        return
    for info in parsed.tensors.values():  # what is accepted lies inside the file and matches its dtype and shape
        assert 0 <= info.start and info.start + info.nbytes <= path.stat().st_size


@FAST
@given(blob=st.binary(max_size=200))
def test_random_bytes_are_never_a_safetensors_file_by_accident(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("rb") / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(SafetensorsFormatError):
        read_header(path)


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
KEYS = st.sampled_from(
    [
        "quantization_level",
        "export_formats",
        "onnx_opset_version",
        "onnx_dynamic_axes",
        "batch_size",
        "max_shard_size",
        "validation_tolerance",
        "gguf_type",
        "checkpoint_selection",
        "output_dir",
        "lang",
        "test_input_samples",
        "base_model_load_in_4bit",
        "base_model_load_in_8bit",
        "onnx_block_size",
        "quantisation_level",
        "not_a_key",
    ]
)


@FAST
@given(config=st.dictionaries(KEYS, VALUES, max_size=6))
@example(config={"output_dir": "~0"})  # found by this test: pathlib's expanduser raised for an unknown user
@example(config={"output_dir": "a\0b"})  # found by this test: a NUL in a path made os functions raise ValueError
def test_any_configuration_mapping_gives_problems_not_crashes(config):
    problems = validate_config(config)  # never raises for a mapping
    for problem in problems:
        assert problem.key and problem.render()


@FAST
@given(text=st.text(max_size=200))
@example(text="?")  # found by this test: a YAML key that is not a string
def test_any_yaml_text_parses_or_fails_with_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        validate_config(path)
    except ConfigError as exc:
        assert exc.code.startswith("ME1")


NAMES = st.sampled_from(["checkpoint-1", "checkpoint-2", "checkpoint-10", "checkpoint-x", "runs", "adapter"])
FILES = st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "README.md"])


@FAST
@given(
    tree=st.lists(
        st.tuples(
            NAMES,
            FILES,
            st.sampled_from(
                ["", "{}", '{"peft_type": "LORA"}', "garbage", '{"global_step": "x", "best_model_checkpoint": 5}']
            ),
        ),
        max_size=8,
    ),
    selection=st.sampled_from(["latest", "best"]),
)
@example(
    tree=[("checkpoint-1", "trainer_state.json", '{"global_step": "x", "best_model_checkpoint": 5}')], selection="best"
)  # found by this test: a best_model_checkpoint that is not a string
def test_the_detector_on_any_tree_selects_a_complete_checkpoint_or_explains(tmp_path_factory, tree, selection):
    root = tmp_path_factory.mktemp("run")
    for folder, name, content in tree:
        (root / folder).mkdir(exist_ok=True)
        (root / folder / name).write_text(content)
    try:
        found = detect(root, selection)
    except CheckpointValidationError as exc:
        assert exc.code.startswith("ME2")
        return
    # what is selected has a readable config and a weights file, and it is one of the tree's folders (or the root)
    assert (found.path / "adapter_config.json").is_file() and (found.path / "adapter_model.safetensors").is_file()
    assert found.path == root or found.path.parent == root

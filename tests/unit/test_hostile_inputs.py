"""Issue 14: hostile and broken inputs end in one of the tool's own codes (exit 1 or 2), never a traceback or ME999,
nothing is written into an input, and no file from outside an input leaks into an artifact."""

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_export.cli import main
from tests.conftest import tree_digest


@pytest.fixture
def train(adapter, tmp_path):
    """A Trainer-style root with one checkpoint, a private copy the test may damage."""
    root = tmp_path / "train"
    shutil.copytree(adapter, root / "checkpoint-5")
    return root


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def explained(code, text):
    """Exit 1 or 2 with one of our codes, other than ME999 (a fault of our own), and no traceback."""
    assert code in (1, 2) and "Traceback" not in text, text[-1500:]
    assert "code: ME" in text or "ME1" in text or code == 2, text[-1500:]
    assert "ME999" not in text, text[-1500:]


def run_args(train, base, out, *more):
    return [
        "run",
        "--set",
        f"checkpoint_path={train}",
        "--set",
        f"base_model_name={base}",
        "--set",
        f"output_dir={out}",
        "--set",
        "export_formats=[safetensors]",
        *more,
    ]


def edit_adapter_config(train, **changes):
    path = train / "checkpoint-5" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes",
    [
        {"r": "eight"},
        {"lora_alpha": "x"},
        {"target_modules": 5},
        {"use_dora": "yes"},
        {"rank_pattern": [1]},
        {"alpha_pattern": {"q_proj": "big"}},
        {"lora_alpha": float("inf")},
        {"modules_to_save": [1, 2]},
        {"layers_to_transform": "all"},
        {"peft_type": 7},
    ],
)
def test_adapter_config_values_of_the_wrong_type_are_explained(capsys, train, tiny_base, tmp_path, changes):
    edit_adapter_config(train, **changes)
    before = tree_digest(train)
    code, text = run_cli(capsys, *run_args(train, tiny_base, tmp_path / "out"))
    explained(code, text)
    assert "PEFT expects" in text or "ME205" in text
    assert tree_digest(train) == before


@pytest.mark.parametrize(
    "header",
    [
        {"a.lora_A.weight": {"dtype": ["F32"], "shape": [4, 4], "data_offsets": [0, 64]}},
        {"a.lora_A.weight": {"dtype": {"x": 1}, "shape": [4, 4], "data_offsets": [0, 64]}},
        "nested",
    ],
)
def test_hostile_safetensors_headers_are_explained(capsys, train, tiny_base, tmp_path, header):
    raw = ('{"a":' * 200000 + "1" + "}" * 200000).encode() if header == "nested" else json.dumps(header).encode()
    (train / "checkpoint-5" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    code, text = run_cli(capsys, *run_args(train, tiny_base, tmp_path / "out"))
    explained(code, text)
    assert "not a valid safetensors file" in text


def test_a_symlink_loop_in_the_checkpoint_is_explained(capsys, train, tiny_base, tmp_path):
    ckpt = train / "checkpoint-5"
    os.symlink(ckpt / "loop2", ckpt / "loop1")
    os.symlink(ckpt / "loop1", ckpt / "loop2")
    code, text = run_cli(capsys, *run_args(train, tiny_base, tmp_path / "out"))
    explained(code, text)
    assert "a loop, or a missing target" in text


def test_a_deeply_nested_trainer_state_is_explained(capsys, train, tiny_base, tmp_path):
    (train / "checkpoint-5" / "trainer_state.json").write_text("[" * 100000 + "]" * 100000)
    code, text = run_cli(capsys, *run_args(train, tiny_base, tmp_path / "out", "--set", "checkpoint_selection=best"))
    explained(code, text)
    assert "ME212" in text


@pytest.mark.parametrize("kind", ["nested-yaml", "nested-json", "latin-1"])
def test_configuration_files_nested_or_not_utf8_are_parse_errors(capsys, tmp_path, kind):
    path = tmp_path / ("c.json" if kind == "nested-json" else "c.yaml")
    if kind == "nested-yaml":
        path.write_text("a: " + "[" * 50000 + "]" * 50000)
    elif kind == "nested-json":
        path.write_text("[" * 100000 + "]" * 100000)
    else:
        path.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    for command in (["run", str(path)], ["validate-config", str(path)]):
        code, text = run_cli(capsys, *command)
        assert code == 2 and "ME102" in text and "Traceback" not in text


def test_an_output_dir_that_is_a_file_is_a_configuration_problem(capsys, train, tiny_base, tmp_path):
    (tmp_path / "file").write_text("x")
    code, text = run_cli(capsys, *run_args(train, tiny_base, tmp_path / "file"))
    assert code == 2 and "is a file, not a folder" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["benchmark", ".", "--new-tokens", "-1"],
        ["benchmark", ".", "--repeats", "0"],
        ["benchmark", ".", "--batch-size", "x"],
        ["merge", "--max-shard-size", "abc"],
        ["merge", "--max-shard-size", "0MB"],
    ],
)
def test_cli_values_out_of_range_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


# ---- nothing written into an input, nothing leaked out of one ----


@pytest.mark.parametrize("step", ["export/safetensors", "check", "merge", "verify"])
def test_a_checkpoint_inside_a_folder_the_run_writes_is_refused_before_anything_is_written(
    capsys, adapter, tiny_base, tmp_path, step
):
    out = tmp_path / "out"
    checkpoint = shutil.copytree(adapter, out / step)
    before = tree_digest(checkpoint)
    code, text = run_cli(capsys, *run_args(checkpoint, tiny_base, out))
    assert code == 2 and "which the run writes" in text and str(out / step.split("/")[0]) in text
    assert tree_digest(checkpoint) == before and not (out / "run.json").exists()


def test_a_checkpoint_linked_into_a_step_folder_is_refused_too(capsys, adapter, tiny_base, tmp_path):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    os.symlink(adapter, out / "export" / "safetensors")  # resolved through the link: the same folder
    code, text = run_cli(capsys, *run_args(adapter, tiny_base, out))
    assert code == 2 and "which the run writes" in text


def test_an_input_beside_the_step_folders_is_left_alone(capsys, adapter, tiny_base, tmp_path):
    """output_dir may hold other things: only its step folders and files are the run's."""
    out = tmp_path / "out"
    checkpoint = shutil.copytree(adapter, out / "my-adapter")
    (checkpoint / "notes.partial").write_text("mine")  # cleanup_temp_files removes *.partial only in step folders
    before = tree_digest(checkpoint)
    code, _ = run_cli(capsys, *run_args(checkpoint, tiny_base, out))
    assert code == 0 and tree_digest(checkpoint) == before


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "generation_config.json"])
def test_a_training_root_file_linking_outside_is_refused_and_never_copied(capsys, train, tiny_base, tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    os.symlink(secret, train / name)
    out = tmp_path / "out"
    code, text = run_cli(capsys, *run_args(train, tiny_base, out))
    assert code == 1 and "ME214" in text and "is a symbolic link to" in text
    leaked = [p for p in out.rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()] if out.exists() else []
    assert leaked == []


def test_a_fifo_where_a_tokenizer_file_should_be_is_refused_without_hanging(capsys, train, tiny_base, tmp_path):
    os.mkfifo(train / "tokenizer_config.json")
    code, text = run_cli(capsys, *run_args(train, tiny_base, tmp_path / "out"))
    assert code == 1 and "ME218" in text


def test_an_adapter_that_makes_the_outputs_uniform_is_not_a_reference(capsys, tmp_path):
    """lora_B scaled by 1e18: every next-token distribution is uniform; 1e30: the logits overflow. Either way nothing
    can be verified against it, and the run says so instead of reporting the artifacts verified."""
    import torch
    from safetensors.torch import load_file, save_file

    from model_export.demo.run import shipped_base
    from model_export.demo.tiny import build_adapter

    for scale, words in ((1e18, "no better than a uniform guess"), (1e30, "inf or NaN")):
        adapter = build_adapter(shipped_base(), tmp_path / f"ad-{scale:g}")
        tensors = load_file(adapter / "adapter_model.safetensors")
        save_file(
            {k: v * scale if "lora_B" in k else v for k, v in tensors.items()}, adapter / "adapter_model.safetensors"
        )
        out = tmp_path / f"out-{scale:g}"
        code, text = run_cli(capsys, *run_args(adapter, shipped_base(), out))
        assert code == 1 and "ME604" in text and words in text, text[-1500:]
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "failed" and not any(row["status"] == "verified" for row in report["artifacts"])
    assert torch.isfinite(torch.tensor(1.0))


# ---- a generated corpus: adapter_config.json values of every type ----

VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=3)), max_size=2),
)
KEY = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "target_modules",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "peft_type",
        "base_model_name_or_path",
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(KEY, VALUE, min_size=1, max_size=3))
def test_any_adapter_config_values_give_an_answer_of_ours(capsys, adapter, tiny_base, tmp_path_factory, changes):
    root = tmp_path_factory.mktemp("gen")
    shutil.copytree(adapter, root / "checkpoint-5")
    path = root / "checkpoint-5" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, allow_nan=True))
    before = tree_digest(root)
    code, text = run_cli(capsys, "check", str(root), "--base", str(tiny_base))
    assert code in (0, 1) and "Traceback" not in text and "ME999" not in text, (changes, text[-800:])
    assert tree_digest(root) == before


def test_a_base_rewritten_with_the_same_size_and_mtime_is_noticed(adapter, tiny_base, tmp_path):
    from model_export import ExportConfiguration, run

    base = shutil.copytree(tiny_base, tmp_path / "base")
    config = ExportConfiguration(
        checkpoint_path=str(adapter),
        base_model_name=str(base),
        output_dir=str(tmp_path / "out"),
        run_validation_tests=False,
    )
    run(config)
    weights = base / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(b ^ 0x5A for b in data[-100:])  # other weights, same size: the last sampled block covers them
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = run(config)
    assert again.steps["check"]["skipped"] is False and again.steps["merge"]["skipped"] is False


def test_init_config_where_it_cannot_write_is_explained(capsys, tmp_path):
    (tmp_path / "file").write_text("x")  # a path through a file: no folder can be made there, even as root
    code, text = run_cli(capsys, "init-config", str(tmp_path / "file" / "model-export.yaml"))
    assert code == 2 and "ME110" in text and "Cannot write" in text and "Traceback" not in text


SHORT_WRITE = """
import errno, resource, signal, sys
from pathlib import Path
import torch
from model_export.files import torch_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
path = Path(sys.argv[1])
try:
    torch.save(torch.zeros(1 << 16), path)
    print("torch: saved")
except RuntimeError as exc:
    print("torch:", "unexpected pos" in str(exc))
try:
    torch_save(torch.zeros(1 << 16), path)
    print("ours: saved")
except OSError as exc:
    print("ours:", exc.errno == errno.ENOSPC, path.exists())
"""


def test_a_torch_file_the_disk_cannot_hold_is_a_full_disk(tmp_path):
    """torch reports a write that stopped short as a RuntimeError ("unexpected pos"), which a run would call its own
    fault (ME999: seen when a benchmark filled the disk during the reference's save); files.torch_save raises it as
    ENOSPC, which the step turns into ME403 (the test above), and removes what was written. The short write is real: a
    file size limit, in a process of its own."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split("\n")[:2] == ["torch: True", "ours: True False"], done.stderr[-2000:]


def test_a_full_disk_while_run_json_is_saved_is_explained(adapter, tiny_base, tmp_path, monkeypatch):
    import errno

    from model_export import ExportConfiguration, ResourceError, run
    from model_export.pipeline.manifest import RunManifest

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunManifest, "save", full)
    with pytest.raises(ResourceError) as err:
        run(
            ExportConfiguration(
                checkpoint_path=str(adapter), base_model_name=str(tiny_base), output_dir=str(tmp_path / "o")
            )
        )
    assert err.value.code == "ME403" and "run.json" in str(err.value)


def test_a_cache_saved_without_crcs_loads_the_same_and_artifacts_keep_theirs(tmp_path):
    """The run's caches (references, logits) skip the zip's CRC32s, which only slowed their writing; torch.load reads
    them back equal. Anything else keeps them (zipfile checks them), and torch's setting is left as it was."""
    import zipfile

    import torch

    from model_export.files import torch_save

    pytest.importorskip("torch.utils.serialization")
    from torch.utils.serialization import config

    data = {"logits": torch.randn(64, 300), "ids": torch.arange(7)}
    before = config.save.compute_crc32
    torch_save(data, tmp_path / "cache.pt", crc=False)
    torch_save(data, tmp_path / "kept.pt")
    assert config.save.compute_crc32 == before
    for name in ("cache.pt", "kept.pt"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert all(torch.equal(loaded[k], v) for k, v in data.items())
    assert zipfile.ZipFile(tmp_path / "kept.pt").testzip() is None
    assert zipfile.ZipFile(tmp_path / "cache.pt").testzip() is not None  # the CRCs were left out


def test_large_writes_reach_the_kernel_in_slices_and_read_back_whole(tmp_path, monkeypatch):
    """files.write_sliced hands the file WRITE_BYTES at a time (64 MB writes cost the kernel several times the system
    time here: docs/benchmarks.md); a merge's shard (tensor_io.ShardWriter) and a torch file (files.torch_save) are
    written through it, and what is read back is what was given."""
    import torch
    from safetensors.torch import load_file

    from model_export import files, tensor_io
    from model_export.tensor_io import PlannedTensor, ShardWriter

    class Recorded:
        def __init__(self):
            self.sizes, self.data = [], bytearray()

        def write(self, data):
            self.sizes.append(len(data))
            self.data += data

    monkeypatch.setattr(files, "WRITE_BYTES", 1000)
    recorded, data = Recorded(), bytes(range(256)) * 20
    files.write_sliced(recorded, data)
    assert recorded.sizes == [1000] * 5 + [120] and bytes(recorded.data) == data
    values, sliced, write_sliced = torch.arange(5000, dtype=torch.float32), [], files.write_sliced
    spy = lambda fh, data: sliced.append(memoryview(data).nbytes) or write_sliced(fh, data)  # noqa: E731
    monkeypatch.setattr(files, "write_sliced", spy)
    monkeypatch.setattr(tensor_io, "write_sliced", spy)
    files.torch_save({"values": values}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["values"], values)
    assert max(sliced) >= values.nbytes  # the tensor's record went through it whole
    sliced.clear()
    writer = ShardWriter(tmp_path / "x.safetensors", [PlannedTensor("values", "F32", (5000,))])
    writer.write(values.numpy().tobytes())
    writer.close()
    assert torch.equal(load_file(tmp_path / "x.safetensors")["values"], values) and values.nbytes in sliced

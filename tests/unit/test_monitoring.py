"""Log lines as the guide shows them: memory usage, progress, step durations, and a log file."""

import logging
import re
import time

import pytest

from model_export import validate_checkpoint
from model_export.monitoring import MemoryMonitor, Progress, memory_line, setup_logging, timed_step


def test_memory_line_has_the_guides_shape():
    assert re.fullmatch(r"Memory usage: \d+\.\dGB / \d+\.\dGB \(\d+\.\d%\)", memory_line())


def test_memory_monitor_logs_periodically_and_tracks_the_peak(caplog):
    with caplog.at_level(logging.INFO, logger="model_export"):
        with MemoryMonitor(interval=0.05) as monitor:
            block = bytearray(50_000_000)
            time.sleep(0.3)
            del block
    lines = [r.message for r in caplog.records if r.message.startswith("Memory usage:")]
    assert len(lines) >= 4 and monitor.peak_rss > 50_000_000


def test_progress_lines_every_ten_percent(caplog):
    with caplog.at_level(logging.INFO, logger="model_export"):
        progress = Progress("Processing checkpoint", 200)
        for _ in range(8):
            progress.advance(25)
    # 25 of 200 per call: 12.5%, 25%, 37.5%, ... each line names the last ten-percent mark passed
    assert [r.message for r in caplog.records] == [
        f"Processing checkpoint: {p}% complete" for p in (10, 20, 30, 50, 60, 70, 80, 100)
    ]


def test_checkpoint_validation_logs_progress(caplog, adapter):
    with caplog.at_level(logging.INFO, logger="model_export"):
        validate_checkpoint(adapter)
    progress = [r.message for r in caplog.records if r.message.startswith("Processing checkpoint")]
    assert progress[-1] == "Processing checkpoint: 100% complete" and len(progress) >= 5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model_export"):
        validate_checkpoint(adapter, progress=False)
    assert not [r for r in caplog.records if r.message.startswith("Processing checkpoint")]


def test_timed_step_logs_duration_and_failures(caplog):
    with caplog.at_level(logging.INFO, logger="model_export"):
        with timed_step("check") as record:
            time.sleep(0.01)
        with pytest.raises(RuntimeError), timed_step("merge"):
            raise RuntimeError("CUDA out of memory")
    assert record["seconds"] >= 0.01
    assert re.fullmatch(r"Step check finished \(duration 0\.\d\d s\)", caplog.records[0].message)
    assert caplog.records[1].levelname == "ERROR" and "Step merge failed" in caplog.records[1].message


def test_log_file_uses_the_guides_format(tmp_path):
    log = tmp_path / "export.log"
    setup_logging("DEBUG", log, console=False)
    try:
        logging.getLogger("model_export").debug("hello")
        logging.getLogger("model_export").info(memory_line())
    finally:
        setup_logging("INFO", None)
    lines = log.read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ - model_export - DEBUG - hello", lines[0])
    assert " - INFO - Memory usage: " in lines[1]


def test_a_silent_step_gets_a_heartbeat_line_in_the_log(tmp_path, monkeypatch):
    """No step goes HEARTBEAT_SECONDS without a line in the log file, whether or not it counts progress; a step that
    logs on its own gets no heartbeat."""
    from model_export import monitoring

    monkeypatch.setattr(monitoring, "HEARTBEAT_SECONDS", 0.5)
    log = tmp_path / "export.log"
    setup_logging("INFO", log, console=False)
    try:
        with timed_step("verify"):
            time.sleep(1.8)  # a single native call: nothing to count
        with timed_step("merge"):
            for _ in range(18):
                logging.getLogger("model_export").info("working")
                time.sleep(0.1)
    finally:
        setup_logging("INFO", None)
    lines = log.read_text().splitlines()
    beats = [line for line in lines if "still running" in line]
    assert len(beats) >= 2 and all(re.search(r"Step verify still running \(\d+ s so far\)", b) for b in beats)
    stamps = [time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) for line in lines]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 1.5


def test_third_party_bars_stay_silent_unless_debugging(tiny_base, tmp_path, capsys):
    """compressed-tensors draws "Applying quantization config" bars with tqdm's disable=False, whatever TQDM_DISABLE
    says: loading the int4 artifact in transformers writes nothing to stderr, except with --debug."""
    pytest.importorskip("compressed_tensors")
    from model_export.exporters.safetensors_quant import export_quantized_safetensors
    from model_export.runtimes.hf import TransformersRuntime

    export_quantized_safetensors(tiny_base, tmp_path / "q", bits=4)
    setup_logging("INFO", None)
    capsys.readouterr()
    TransformersRuntime(tmp_path / "q").close()
    assert "quantization config" not in capsys.readouterr().err
    setup_logging("DEBUG", None)
    try:
        TransformersRuntime(tmp_path / "q").close()
        assert "Applying quantization config" in capsys.readouterr().err
    finally:
        setup_logging("INFO", None)


def test_on_a_terminal_the_heartbeat_speaks_every_few_seconds_but_the_log_file_keeps_its_pace(tmp_path, monkeypatch):
    from model_export import monitoring

    monkeypatch.setattr(monitoring, "HEARTBEAT_SECONDS", 2.0)
    monkeypatch.setattr(monitoring, "CONSOLE_HEARTBEAT_SECONDS", 0.3)
    monkeypatch.setattr(monitoring.sys.stderr, "isatty", lambda: True, raising=False)
    log = tmp_path / "export.log"
    setup_logging("INFO", log, console=False)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("model_export").addHandler(handler)
    try:
        with timed_step("verify"):
            time.sleep(2.6)
    finally:
        logging.getLogger("model_export").removeHandler(handler)
        setup_logging("INFO", None)
    console_beats = [m for m in seen if "still running" in m]
    file_beats = [line for line in log.read_text().splitlines() if "still running" in line]
    assert len(console_beats) >= 4 and len(file_beats) == 1

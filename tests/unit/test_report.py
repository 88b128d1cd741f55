"""The report's rows: sizes against the base, the verdicts, and the warning that says why an artifact is larger."""

import json

from model_export.pipeline.report import summary_rows, write_report


def results(size, precision, fmt="safetensors", base_dtypes=("BF16",), untied=False, status="verified"):
    verdict = {
        "status": status,
        "rule": "r",
        "max_abs_diff": 0.0,
        "mean_kl": 0.0,
        "top1_agreement": 1.0,
        "precision": precision,
        "samples": [{}],
        "perplexity": 9.5,
        "reference_perplexity": 9.4,
        "artifact": f"/x/{fmt}",
    }
    return {
        "check": {"base_bytes": 1000, "base_dtypes": list(base_dtypes)},
        "merge": {"untied_embeddings": untied},
        "export": {"artifacts": {fmt: f"/x/{fmt}"}, "sizes": {fmt: size}},
        "verify": {"verdicts": {fmt: verdict}},
    }


def test_an_fp32_artifact_twice_a_bf16_base_says_why():
    [row] = summary_rows(results(2000, "full"))
    assert row["size_vs_base"] == 2.0 and "stored in fp32 while the base is BF16" in row["warning"]
    assert "quantization_level: bf16" in row["warning"] and "untied" not in row["warning"]
    assert row["perplexity"] == 9.5 and row["reference_perplexity"] == 9.4


def test_the_warning_names_only_causes_that_apply():
    """An fp32 run blames neither bf16 nor int8: untied embeddings are the cause here, and only they are named."""
    [row] = summary_rows(results(2000, "full", base_dtypes=("F32",), untied=True))
    assert "two matrices" in row["warning"] and "fp32" not in row["warning"] and "int8" not in row["warning"]
    [row] = summary_rows(results(1300, "full", fmt="onnx", base_dtypes=("F32",)))
    assert (
        "rotary tables" in row["warning"] and "bf16" not in row["warning"].lower() and "quantized" not in row["warning"]
    )


def test_smaller_or_nearly_equal_artifacts_get_no_warning():
    assert summary_rows(results(1040, "full"))[0]["warning"] is None
    assert summary_rows(results(500, "reduced"))[0]["warning"] is None


def test_a_larger_onnx_folder_names_what_onnx_adds():
    [row] = summary_rows(results(1300, "reduced", fmt="onnx", base_dtypes=("F32",)))
    assert "rotary tables" in row["warning"] and row["size_vs_base"] == 1.3


def test_a_verdict_not_run_is_counted_as_such_and_report_json_is_strict(tmp_path):
    data = results(900, "reduced", fmt="gguf", status="not_run")
    data["verify"]["verdicts"]["gguf"].update(reason="llama-cpp-python is not installed", max_abs_diff=float("nan"))
    [row] = summary_rows(data)
    assert (
        row["status"] == "not_run" and row["verified"] is False and row["reason"] == "llama-cpp-python is not installed"
    )
    write_report(tmp_path, {"steps": {}}, data, [])
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    report = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # NaN/Infinity rejected
    assert (
        report["status"] == "not_verified"
        and report["summary"] == "0 verified, 1 not run (gguf: llama-cpp-python is not installed)"
    )
    html = (tmp_path / "report.html").read_text()
    assert "Not verified" in html and "Passed" not in html


def test_without_verification_nothing_is_called_verified():
    data = results(900, "reduced")
    data["verify"] = {"skipped": "run_validation_tests is false"}
    [row] = summary_rows(data)
    assert row["status"] == "not_run" and row["reason"] == "run_validation_tests is false"


def test_run_json_of_this_version_is_read_its_steps_mapped_and_any_other_version_refused(tmp_path):
    import pytest

    from model_export import ConfigError
    from model_export.pipeline.manifest import VERSION, RunManifest

    steps = {
        "export:onnx": {"status": "done", "key": "k", "values": {"onnx_opset_version": 17}, "unknown_field": 1},
        "export": {"status": "done", "key": "k2", "result": {"artifacts": {"onnx": "x/onnx"}}},
        "no-such-step": {"status": "done", "key": "k3"},
    }
    (tmp_path / "run.json").write_text(json.dumps({"version": VERSION, "steps": steps}))
    manifest = RunManifest.load(tmp_path)
    assert list(manifest.steps) == ["export:onnx", "export"]  # a step the run does not declare is not read
    assert manifest.steps["export:onnx"].values == {"onnx_opset_version": 17}
    assert manifest.export().artifacts == {"onnx": "x/onnx"}
    manifest.save(tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text())["version"] == VERSION
    for version in (1, VERSION - 1, VERSION + 1, "3"):
        (tmp_path / "run.json").write_text(json.dumps({"version": version, "steps": {}}))
        with pytest.raises(ConfigError) as err:
            RunManifest.load(tmp_path)
        assert err.value.code == "ME109" and "pip install -U model-export" in err.value.hint()
        assert f"run.json version {version};" in str(err.value)


def test_an_empty_logit_panel_says_why(tmp_path):
    """Issue 24: the 'Logit differences: gguf' panel of an artifact not run was an empty frame."""
    data = results(900, "reduced", fmt="gguf", status="not_run")
    data["verify"]["verdicts"]["gguf"].update(reason="llama-cpp-python is not installed", diff_histogram={})
    write_report(tmp_path, {"steps": {}}, data, [])
    page = (tmp_path / "report.html").read_text()
    panel = page.split("Logit differences: gguf")[1][:400]
    assert "No logit differences to show: not run (llama-cpp-python is not installed)" in panel


def test_the_base_alone_perplexity_stands_beside_the_adapters(tmp_path):
    data = results(900, "full")
    data["verify"]["reference"] = {"device": "cpu", "precision": "full", "perplexity": 9.4, "base_perplexity": 12.25}
    write_report(tmp_path, {"steps": {}}, data, [])
    page = (tmp_path / "report.html").read_text()
    assert "base alone 12.250, base + adapter (the reference) 9.400" in page
    chart = page[page.index("Perplexity on the held-out text (lower is better)") :].split("</svg>")[0]
    assert chart.index(">base alone<") < chart.index(">reference<") < chart.index(">safetensors<")


def test_a_rerun_that_skipped_steps_says_whose_memory_the_chart_shows(tmp_path):
    """The chart is this process's memory (0.24 GiB after skipping everything) while the steps table keeps the peaks of
    the run that did the work (0.44 GiB): the page says which is which."""
    steps = {"merge": {"status": "done", "skipped": True, "seconds": 1.0, "peak_rss": 0.44 * 2**30}}
    write_report(tmp_path, {"steps": steps}, results(900, "full"), [(0.0, 2**28), (1.0, 2**28)])
    page = (tmp_path / "report.html").read_text()
    assert "1 step(s) skipped in this run (merge): this chart is this run" in page and "0.44 GiB" in page


def test_the_artifacts_table_keeps_the_rule_under_the_verdict_and_wraps_paths(tmp_path):
    data = results(900, "full")
    data["verify"]["verdicts"]["safetensors"]["rule"] = "read back (24 tensors ...), llama.cpp: top-1 >= 0.85"
    write_report(tmp_path, {"steps": {}}, data, [])
    page = (tmp_path / "report.html").read_text()
    header = page.split('<table class="artifacts"><tr>')[1].split("</tr>")[0]
    assert header.count("<th>") == 8 and "rule" in header  # "verification and rule": no column of its own
    assert 'class="muted rule">read back (24 tensors' in page and "td code{overflow-wrap:anywhere}" in page

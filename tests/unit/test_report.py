"""The report's rows: sizes against the base and the warning that says why an artifact is larger."""

from model_export.report import summary_rows


def results(size, precision, fmt="safetensors"):
    verdict = {"passed": True, "rule": "r", "max_abs_diff": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0, "precision": precision,
               "samples": [{}], "perplexity": 9.5, "reference_perplexity": 9.4, "artifact": f"/x/{fmt}"}
    return {"check": {"base_bytes": 1000}, "export": {"artifacts": {fmt: f"/x/{fmt}"}, "sizes": {fmt: size}},
            "verify": {"verdicts": {fmt: verdict}}}


def test_an_fp32_artifact_twice_the_base_says_why():
    [row] = summary_rows(results(2000, "full"))
    assert row["size_vs_base"] == 2.0 and "stored in fp32" in row["warning"] and "quantization_level: bf16" in row["warning"]
    assert row["perplexity"] == 9.5 and row["reference_perplexity"] == 9.4


def test_smaller_or_nearly_equal_artifacts_get_no_warning():
    assert summary_rows(results(1040, "full"))[0]["warning"] is None
    assert summary_rows(results(500, "reduced"))[0]["warning"] is None


def test_a_larger_onnx_folder_names_what_onnx_adds():
    [row] = summary_rows(results(1300, "reduced", fmt="onnx"))
    assert "rotary tables" in row["warning"] and row["size_vs_base"] == 1.3

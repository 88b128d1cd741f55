"""GPTQ on one layer and its calibration inputs: against the algorithm's unblocked form (the OBS update of the paper,
column by column, with the inverse Hessian updated each time), against onnxruntime's GPTQ mode (whose error
propagation turns out to be a no-op: it lands on round-to-nearest's error), and below round-to-nearest on the same
grid. benchmarks/gptq_vs_llmcompressor.py compares with llm-compressor's GPTQ (the same results; llm-compressor pins
older transformers and compressed-tensors, so it cannot be a test dependency)."""

import numpy as np
import pytest
import torch

from model_export.quantize.gptq import gptq, group_scales, rtn


def layer(seed=0, out=96, inputs=256, tokens=768):
    """A weight and calibration inputs with correlated, unequal channels (as a real layer's inputs are)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inputs, generator=g) * 0.05
    mixing = torch.randn(inputs, inputs, generator=g) / inputs**0.5
    energy = torch.exp(torch.randn(inputs, generator=g))
    x = (torch.randn(tokens, inputs, generator=g) @ mixing) * energy
    return weight, x


def dequantized(levels, scales, group):
    return levels.float() * scales.repeat_interleave(group, dim=1)


def output_error(weight, approx, x):
    return float(((x @ (weight - approx).T) ** 2).sum() / ((x @ weight.T) ** 2).sum())


def test_with_an_identity_hessian_gptq_is_round_to_nearest():
    weight, _ = layer()
    levels, scales = gptq(weight, torch.eye(weight.shape[1]), group_size=64, damp=0.0)
    expected_levels, expected_scales = rtn(weight, 64)
    assert torch.equal(levels, expected_levels) and torch.equal(scales, expected_scales)
    assert levels.dtype == torch.int8 and int(levels.min()) >= -8 and int(levels.max()) <= 7


def unblocked(weight, hessian, group, damp=0.01):
    """The paper's sequential form: round column i, spread its error with row i of H^-1, remove i from H^-1."""
    w = weight.double().clone()
    h = hessian.double() + damp * hessian.double().diag().mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    scales = group_scales(weight, group).double().repeat_interleave(group, dim=1)
    levels = torch.zeros_like(w)
    for i in range(w.shape[1]):
        levels[:, i] = torch.clamp(torch.round(w[:, i] / scales[:, i]), -8, 7)
        error = (w[:, i] - levels[:, i] * scales[:, i]) / hinv[i, i]
        w[:, i:] -= error[:, None] * hinv[i, i:][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return levels, scales.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_gptq_is_the_papers_sequential_update(seed):
    weight, x = layer(seed)
    hessian = x.T @ x
    levels, scales = gptq(weight, hessian, group_size=128)
    expected, columns = unblocked(weight, hessian, 128)
    assert float((levels.double() != expected).double().mean()) < 0.005  # float32 vs float64: a few ties differ
    ours = output_error(weight, dequantized(levels, scales, 128), x)
    reference = output_error(weight, expected.float() * columns, x)
    assert abs(ours - reference) <= 0.01 * reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_error_is_below_round_to_nearest_and_onnxruntimes(seed):
    weight_only = pytest.importorskip("onnxruntime.quantization.neural_compressor.weight_only")
    weight, x = layer(seed)
    hessian = x.T @ x
    levels, scales = gptq(weight, hessian, group_size=128)
    ours = output_error(weight, dequantized(levels, scales, 128), x)
    theirs_q = weight_only.gptq(
        weight.T.double().numpy().copy(),
        hessian.double().numpy().copy(),
        num_bits=4,
        group_size=128,
        scheme="sym",
        blocksize=128,
        percdamp=0.01,
    )
    theirs = output_error(weight, torch.from_numpy(np.asarray(theirs_q)).T.float(), x)
    nearest = output_error(weight, dequantized(*rtn(weight, 128), 128), x)
    assert ours < nearest * 0.6, (ours, nearest)
    # onnxruntime's in-block and between-block updates read the lower triangle of an upper Cholesky factor (its
    # weights are [in, out]), which is zero: its GPTQ mode rounds to nearest with its error propagation a no-op.
    assert abs(theirs - nearest) <= 0.01 * nearest and ours < theirs * 0.6, (ours, theirs, nearest)


def test_act_order_uses_static_groups_and_still_beats_round_to_nearest():
    weight, x = layer(3)
    hessian = x.T @ x
    levels, scales = gptq(weight, hessian, group_size=64, act_order=True)
    assert torch.equal(scales, group_scales(weight, 64))  # static: the original weights' group scales
    plain = output_error(weight, dequantized(*gptq(weight, hessian, group_size=64), 64), x)
    ordered = output_error(weight, dequantized(levels, scales, 64), x)
    nearest = output_error(weight, dequantized(*rtn(weight, 64), 64), x)
    assert ordered < nearest * 0.8 and ordered < plain  # inputs with the most energy first: less error here


def test_scales_are_exact_in_the_checkpoints_dtype():
    weight, x = layer(4)
    levels, scales = gptq(weight, x.T @ x, group_size=128, dtype=torch.bfloat16)
    assert torch.equal(scales, scales.to(torch.bfloat16).float())


@pytest.mark.parametrize(
    "case", ["plain", "act order", "a dead input", "a singular Hessian"], ids=lambda case: case.replace(" ", "-")
)
def test_the_error_gptq_reports_is_its_output_error(case):
    """The output error GPTQ reports comes from its own loss (the squared scaled errors, minus the dampening's share),
    with no product with H: it equals ||X (W - Q)^T||^2 computed from the inputs, with act order, an input never seen
    (a zero column of X) and a Hessian that needs more dampening than asked to be inverted."""
    from model_export.quantize.gptq import _gptq, hessian_inverse

    weight, x = layer(5)
    damp = 0.01
    if case == "a dead input":
        x[:, 7] = 0
    if case == "a singular Hessian":
        x, damp = x[:64], 0.0  # 64 tokens for 256 inputs: rank 64, and no dampening asked
    inverse = hessian_inverse(x.T @ x, act_order=case == "act order", damp=damp)
    levels, scales, error = _gptq(weight, inverse, 128, None)
    assert inverse.damping > 0  # asked for, or (singular Hessian) added until it could be inverted
    direct = float(((x @ (weight - dequantized(levels, scales, 128)).T) ** 2).sum())
    assert error == pytest.approx(direct, rel=1e-4)
    public = gptq(weight, x.T @ x, group_size=128, act_order=case == "act order", damp=damp)
    assert torch.equal(levels, public[0]) and torch.equal(scales, public[1])


def test_one_calibration_pass_is_gptq_on_each_matrix(tiny_base, tmp_path):
    """calibrate_gptq's single pass (the layer-streamed model, one inverse per input that several matrices read, errors
    from GPTQ's loss and the layer's outputs) writes what gptq() gives each matrix on the Hessian of its inputs in
    transformers, and reports the mean of their output errors, GPTQ's and round-to-nearest's."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from model_export.quantize.gptq import GptqLayers, calibrate_gptq

    samples = [[(7 * i + 13 * j) % 300 + 5 for j in range(48)] for i in range(4)]
    stats = calibrate_gptq(tiny_base, samples, tmp_path / "gptq", group_size=32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    hessians, weights = {}, {}
    for index, decoder in enumerate(model.model.layers):
        for name, module in decoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                key = f"model.layers.{index}.{name}"
                weights[key] = module.weight.detach()
                module.register_forward_pre_hook(
                    lambda m, args, key=key: hessians.__setitem__(
                        key, args[0].reshape(-1, args[0].shape[-1]).T @ args[0].reshape(-1, args[0].shape[-1])
                    )
                )
    with torch.no_grad():
        model.model(torch.tensor(samples))
    written, errors = GptqLayers(tmp_path / "gptq"), []
    for key, weight in weights.items():
        hessian = hessians[key]
        levels, scales = gptq(weight, hessian, group_size=32, dtype=torch.float32)  # the base's dtype
        got_levels, got_scales = written.levels(key)
        assert torch.equal(got_scales, scales)
        assert float((got_levels != levels).float().mean()) < 0.002, key  # float32 sums in another order
        energy = float(((weight @ hessian) * weight).sum())
        errors.append(
            [
                float(((delta @ hessian) * delta).sum()) / energy
                for delta in (
                    weight - dequantized(levels, scales, 32),
                    weight - dequantized(*rtn(weight, 32, torch.float32), 32),
                )
            ]
        )
    assert stats["matrices"] == len(weights)
    assert stats["output_error"] == pytest.approx(sum(e for e, _ in errors) / len(errors), rel=1e-3)
    assert stats["output_error_rtn"] == pytest.approx(sum(e for _, e in errors) / len(errors), rel=1e-3)

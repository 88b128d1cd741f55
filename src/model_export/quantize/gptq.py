"""GPTQ for int4 weights (Frantar et al., 2022): each column rounded in turn, its rounding error spread over the columns
not yet rounded through the inverse Hessian of the layer's inputs, so that the layer's *outputs* on the calibration
data move as little as possible (round-to-nearest only keeps each weight close).

The grid is compressed-tensors' W4A16 one (symmetric int4 in [-8, 7], one scale per group of ``group_size`` inputs,
scale = max|w| / 7.5 over the group, stored in the model's dtype), so the result packs into the same checkpoint
transformers and vLLM load as our round-to-nearest int4. The groups' scales are those of the weights before any
rounding (static groups, as llm-compressor's observers compute them); with ``act_order`` the columns are rounded in
order of decreasing Hessian diagonal (the inputs with the most energy first) while the groups stay those of the
original order (llm-compressor's ``actorder: weight``), so no column permutation is stored. On the same layer and
inputs the result is llm-compressor's (benchmarks/gptq_vs_llmcompressor.py).

    q, scale = gptq(weight, hessian, group_size=128)     # int8 levels [out, in], scales [out, in / group_size]
    hessian = inputs.T @ inputs (summed over calibration tokens; collect_hessians does it layer by layer)
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "GPTQ_MAX_TOKENS",
    "GptqLayers",
    "HessianInverse",
    "calibrate_gptq",
    "gptq",
    "group_scales",
    "hessian_inverse",
    "rtn",
]

LEVELS = (-8, 7)


def group_scales(weight: Any, group_size: int, dtype: Any = None) -> Any:
    """Symmetric int4 scales of [out, in] weights per group of inputs (compressed-tensors' calculate_qparams), rounded
    to ``dtype`` (the checkpoint stores them so; the levels are chosen with the stored value)."""
    import torch

    blocks = weight.float().reshape(weight.shape[0], -1, group_size)
    low = torch.clamp(blocks.amin(-1), max=0)
    high = torch.clamp(blocks.amax(-1), min=0)
    scale = torch.maximum(low.abs(), high) / ((LEVELS[1] - LEVELS[0]) / 2)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
    return scale.to(dtype).float() if dtype is not None else scale


def _round(values: Any, scale: Any) -> Any:
    import torch

    return torch.clamp(torch.round(values / scale), *LEVELS)


def rtn(weight: Any, group_size: int, dtype: Any = None) -> tuple[Any, Any]:
    """Round-to-nearest on the same grid: (levels int8 [out, in], scales [out, groups])."""
    scale = group_scales(weight, group_size, dtype)
    columns = scale.repeat_interleave(group_size, dim=1)
    import torch

    return _round(weight.float(), columns).to(torch.int8), scale


def gptq(
    weight: Any,
    hessian: Any,
    *,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    dtype: Any = None,
    inverse: HessianInverse | None = None,
) -> tuple[Any, Any]:
    """GPTQ levels and scales of an [out, in] weight, given the [in, in] Hessian sum of its inputs' outer products
    (or ``inverse``, what hessian_inverse made of it: matrices that read the same input share it).

    Returns (levels int8 [out, in] in [-8, 7], scales [out, in / group_size] float32, exact in ``dtype``)."""
    inverse = inverse or hessian_inverse(hessian, act_order=act_order, damp=damp)
    return _gptq(weight, inverse, group_size, dtype, block)[:2]


def _gptq(
    weight: Any, inverse: HessianInverse, group_size: int, dtype: Any, block: int = 128
) -> tuple[Any, Any, float]:
    """gptq's levels and scales, and ||X (W - Q)^T||^2 on the calibration inputs, which the algorithm gives for free.

    The columns are worked on as rows of the transposed weight, so that each column's rounding, its error and the
    rank-1 update of the block's remaining columns run over contiguous memory (about five times faster than on the
    strided columns, the same arithmetic). The sum of the squared scaled errors is the quadratic error under the
    dampened Hessian H + lambda I (the OBS identity: each step's loss is exactly what it adds), so without the
    dampening the output error is that sum minus lambda ||W - Q||^2: no product with H (test_gptq checks it)."""
    import torch

    hinv, order, dead, damping = inverse
    w = weight.float().clone()
    w[:, dead] = 0
    scales = group_scales(w, group_size, dtype)  # static groups: the scales of the weights before any rounding
    rows = w[:, order].T.contiguous()  # [in, out]: row j is column order[j]
    row_scales = scales.repeat_interleave(group_size, dim=1)[:, order].T.contiguous()
    levels = torch.empty_like(rows)
    columns, loss = rows.shape[0], 0.0
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        chunk, inv = rows[start:stop], hinv[start:stop, start:stop]
        errors = torch.empty_like(chunk)
        views = zip(chunk.unbind(), row_scales[start:stop].unbind(), levels[start:stop].unbind(), errors.unbind())
        for i, (row, scale, q, error) in enumerate(views):
            torch.div(row, scale, out=q).round_().clamp_(*LEVELS)
            torch.sub(row, torch.mul(q, scale, out=error), out=error).div_(inv[i, i])
            chunk[i + 1 :].addr_(inv[i, i + 1 :], error, alpha=-1)
        loss += float(errors.square().sum(dtype=torch.float64))
        rows[stop:].addmm_(hinv[start:stop, stop:].T, errors, alpha=-1)
    levels = levels.T[:, torch.argsort(order)].contiguous()
    delta = w - levels * scales.repeat_interleave(group_size, dim=1)
    return levels.to(torch.int8), scales, max(loss - damping * float(delta.square().sum(dtype=torch.float64)), 0.0)


class HessianInverse(NamedTuple):
    """What GPTQ reads of a Hessian: the upper Cholesky factor of its dampened inverse (in ``order``), the column
    order (decreasing diagonal with act_order) and the dead inputs (zero diagonal: never seen in calibration)."""

    factor: Any
    order: Any
    dead: Any
    damping: float  # lambda: what was added to the diagonal before inverting


def hessian_inverse(hessian: Any, *, act_order: bool = False, damp: float = 0.01) -> HessianInverse:
    """The Hessian's part of GPTQ, computed once for every matrix that reads the same input."""
    import torch

    h = hessian.float().clone()
    columns = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns)
    if act_order:
        h = h[order][:, order]
    damping = damp * float(torch.mean(torch.diag(h)))
    h.diagonal().add_(damping)
    factor, added = _inverse_cholesky(h)
    return HessianInverse(factor, order, dead, damping + added)


def _inverse_cholesky(h: Any) -> tuple[Any, float]:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U, what GPTQ's updates read), with more dampening if H is not
    positive definite in float32 (returned: the dampening added). One factorisation and one triangular inverse: with
    J the reversal, J H J = L L^T gives H = R R^T with R = J L J upper, so H^-1 = (R^-1)^T R^-1 and U = R^-1 =
    J L^-1 J."""
    import torch

    flipped, added = h.flip(0, 1), 0.0  # the reversal keeps the diagonal on the diagonal
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            return torch.linalg.solve_triangular(lower, torch.eye(h.shape[0]), upper=False).flip(0, 1), added
        more = max(added * 9, 1e-6 * float(torch.mean(torch.diag(h))))  # the total dampening added grows tenfold
        flipped.diagonal().add_(more)
        added += more
    raise ValueError("the Hessian is not positive definite even with dampening")


GPTQ_MAX_TOKENS = 16384  # calibration tokens run in GPTQ's single pass (their activations are held for one layer)


def calibrate_gptq(
    model_dir: Any,
    samples: list[list[int]],
    out_dir: Any,
    *,
    group_size: int,
    act_order: bool = False,
    on_layer: Any = None,
    imatrix: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """GPTQ on every decoder matrix of the model in ``model_dir``, layer by layer: all ``samples`` run once through the
    layer-streamed model; while a layer runs, hooks sum the outer products of each matrix's inputs (matrices that read
    the same input share one sum); when it has run, each of its matrices is quantized and written, packed as
    compressed-tensors writes int4 (``weight_packed``, ``weight_scale``, ``weight_shape``), to
    ``out_dir/layer-N.safetensors``. One layer's weights and Hessians are in memory at a time. Returns counts and the
    mean relative output error on the calibration inputs, GPTQ's and round-to-nearest's. Given a dict ``imatrix``, the
    same pass fills it with the importance matrix as collect_imatrix returns it (the diagonal of the Hessian sums,
    summed as collect_imatrix sums them), so a run that needs both reads the model once."""
    from pathlib import Path

    import torch

    from ..merging.streamed import StreamedModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = StreamedModel(model_dir)
    hooks = _Pass(model, out_dir, group_size, act_order, on_layer, imatrix is not None)
    handles = hooks.attach()
    try:
        with torch.inference_mode():
            model.model.model(input_ids=torch.tensor(samples, dtype=torch.long), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.close()
    if imatrix is not None:
        from .gguf_types import gguf_names

        names = gguf_names(model.config, list(hooks.squares))
        tokens = len(samples) * len(samples[0])
        imatrix.update({names[n]: (total.to(torch.float32).numpy(), tokens) for n, total in hooks.squares.items()})
    errors = hooks.errors
    return {
        "layers": len(hooks.layers),
        "matrices": len(errors),
        "group_size": group_size,
        "act_order": act_order,
        "output_error": sum(e for e, _ in errors) / len(errors),
        "output_error_rtn": sum(e for _, e in errors) / len(errors),
    }


class _Pass:
    """The hooks of calibrate_gptq's one pass: while a layer runs, the sums of its matrices' input outer products
    (matrices reading the same input share one); when it has run, its matrices quantized and written."""

    def __init__(self, model: Any, out_dir: Any, group_size: int, act_order: bool, on_layer: Any, squares: bool):
        import torch

        self.model, self.out_dir, self.group_size, self.act_order = model, out_dir, group_size, act_order
        self.on_layer, self.want_squares = on_layer, squares
        self.layers = model.model.model.layers
        self.linear = {
            index: [f"model.layers.{index}.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
            for index, layer in enumerate(self.layers)
        }
        self.hessians: dict[str, Any] = {}
        self.energies: dict[str, float] = {}
        self.squares: dict[str, Any] = {}
        self.shared: dict[int, tuple[Any, Any, Any]] = {}
        self.errors: list[tuple[float, float]] = []

    def attach(self) -> list[Any]:
        import torch

        handles = []
        for index, layer in enumerate(self.layers):
            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    full = f"model.layers.{index}.{name}"
                    handles.append(module.register_forward_pre_hook(self.before(full)))
                    handles.append(module.register_forward_hook(self.after(full)))
            handles.append(layer.register_forward_hook(lambda layer, args, output, index=index: self.quantize(index)))
        return handles

    def before(self, name: str) -> Any:
        import torch

        def hook(module: Any, args: Any) -> None:
            x = args[0]
            seen = self.shared.get(id(x))
            if seen is None or seen[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                square = (flat * flat).sum(dim=0, dtype=torch.float64) if self.want_squares else None
                seen = self.shared[id(x)] = (x, flat.T @ flat, square)
            self.hessians[name] = seen[1]
            if self.want_squares:
                self.squares[name] = seen[2]

        return hook

    def after(self, name: str) -> Any:
        """||X W^T||^2 read off the matrix's own output (the output errors' denominator, without a product with H)."""
        import torch

        def hook(module: Any, args: Any, output: Any) -> None:
            self.energies[name] = float(torch.linalg.vector_norm(output.detach())) ** 2

        return hook

    def quantize(self, index: int) -> None:
        """Layer ``index`` has run: each of its matrices by GPTQ on its Hessian, packed as compressed-tensors writes
        int4, into out_dir/layer-N.safetensors."""
        import torch
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from safetensors.torch import save_file

        from ..tensor_io import torch_dtype

        self.shared.clear()
        tensors, group_size, inverses = {}, self.group_size, {}
        for name in self.linear[index]:
            weight = self.model._weight(f"{name}.weight")
            dtype = torch_dtype(self.model.tensors[f"{name}.weight"].dtype)
            hessian = self.hessians.pop(name)
            if id(hessian) not in inverses:  # q/k/v and gate/up read the same input: one inverse each
                inverses[id(hessian)] = (hessian, hessian_inverse(hessian, act_order=self.act_order))
            inverse = inverses[id(hessian)][1]
            levels, scales, error = _gptq(weight, inverse, group_size, dtype)
            energy = self.energies.pop(name)
            rounded = _output_error(weight, hessian, rtn(weight, group_size, dtype), group_size)
            self.errors.append((error / energy, rounded / energy) if energy > 0 else (0.0, 0.0))
            tensors[f"{name}.weight_packed"] = pack_to_int32(levels, 4)
            tensors[f"{name}.weight_scale"] = scales.to(dtype)
            tensors[f"{name}.weight_shape"] = torch.tensor(tuple(weight.shape))
        save_file(tensors, str(self.out_dir / f"layer-{index}.safetensors"))
        if self.on_layer is not None:
            self.on_layer(index + 1, len(self.layers))


def _output_error(weight: Any, hessian: Any, quantized: tuple[Any, Any], group_size: int) -> float:
    """||X (W - Q)^T||^2 on the calibration inputs, from their Hessian sum H = X^T X, for (levels, scales)."""
    levels, scales = quantized
    delta = weight - levels.float() * scales.repeat_interleave(group_size, dim=1)
    return float(((delta @ hessian) * delta).sum())


class GptqLayers:
    """What calibrate_gptq wrote (``folder/layer-N.safetensors``), read one layer's file at a time: a matrix's packed
    compressed-tensors tensors (for the int4 safetensors) or its levels and scales (for ONNX MatMulNBits blocks)."""

    PARTS = ("weight_packed", "weight_scale", "weight_shape")

    def __init__(self, folder: Any) -> None:
        from pathlib import Path

        self.folder, self._layer, self._handle = Path(folder), None, None

    def packed(self, stem: str) -> dict[str, Any]:
        """``stem`` (model.layers.N.mlp.down_proj): weight_packed, weight_scale, weight_shape."""
        layer = stem.split(".")[2]
        if layer != self._layer:
            from safetensors import safe_open

            self._layer, self._handle = layer, safe_open(str(self.folder / f"layer-{layer}.safetensors"), "pt")
        return {part: self._handle.get_tensor(f"{stem}.{part}") for part in self.PARTS}

    def levels(self, stem: str) -> tuple[Any, Any]:
        """(levels int8 [out, in] in [-8, 7], scales float32 [out, groups])."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        tensors = self.packed(stem)
        shape = tuple(int(d) for d in tensors["weight_shape"])
        return unpack_from_int32(tensors["weight_packed"], 4, shape), tensors["weight_scale"].float()

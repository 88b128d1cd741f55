"""GGUF K-quants (Q2_K ... Q6_K) in numpy, byte for byte what llama.cpp's quantizer writes (and, with an importance
matrix, the legacy q4_0 ... q5_1 blocks, which gguf's Python quantizers only do without one).

Why our own code: ``gguf``'s Python package can only *dequantize* K-quants, and producing them otherwise takes a
native llama.cpp build, the step that fails most often for GGUF exporters' users. This module re-expresses the
algorithms of llama.cpp's ``ggml/src/ggml-quants.c`` (``quantize_row_qN_K_ref`` without an importance matrix,
``quantize_row_qN_K_impl`` with one) and must give the same bytes: tests compare every block with
``ggml_quantize_chunk`` from the libggml that the ``llamacpp`` extra builds.

How it stays exact: ggml-base is compiled without fused multiply-add, so every float expression in C is a chain of
IEEE float32 operations, each rounded. Here each of those operations is one float32 numpy operation in the same order,
vectorised over all (sub-)blocks at once; sums are accumulated element by element in the C loop's order (never numpy's
pairwise sum), ``nearest_int`` is the same bit trick, and early exits of C's refinement loops are replaced by masks
(a pass that changes nothing leaves the state as it was, so running the remaining passes changes nothing either).

    quantize(rows, "q4_k", imatrix=None) -> uint8 [rows, row_bytes]
"""

from __future__ import annotations

import numpy as np

__all__ = ["K_TYPES", "LEGACY_BYTES", "QK_K", "quantize", "row_bytes"]

QK_K = 256
F = np.float32
_EPS = F(1e-15)  # GROUP_MAX_EPS
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
K_TYPES = tuple(BLOCK_BYTES)
LEGACY_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}  # 32-value blocks, here with an importance matrix
BLOCK_VALUES = {**dict.fromkeys(K_TYPES, QK_K), **dict.fromkeys(LEGACY_BYTES, 32)}


def row_bytes(k_type: str, columns: int) -> int:
    return columns // BLOCK_VALUES[k_type] * {**BLOCK_BYTES, **LEGACY_BYTES}[k_type]


def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the mantissa (round half to even)."""
    bits = (np.asarray(v, dtype=F) + F(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _clip(v: np.ndarray, low: int, high: int) -> np.ndarray:
    return np.minimum(np.maximum(v, low), high)


def _sum(terms: np.ndarray) -> np.ndarray:
    """``float s = t[0]; for (i = 1...) s += t[i];`` over axis 0 of a C-contiguous [n, groups] array: numpy reduces
    over the outer axis row by row, in order, in float32 (not pairwise: that is only along the inner axis). C's
    ``s = 0; s += t[0]`` differs from it only in the sign of a zero sum, which nothing here can tell apart."""
    return np.add.reduce(np.ascontiguousarray(terms), axis=0)


def _levels(v: np.ndarray, low: float, high: float) -> np.ndarray:
    """``MAX(low, MIN(high, nearest_int(v)))`` as float32, in place. For |v| < 2**22 (every search here: v is at most
    a few times nmax) nearest_int is exactly rint (both round half to even)."""
    np.rint(v, out=v)
    return np.clip(v, F(low), F(high), out=v)  # float32 bounds: a third faster than Python ints


def _f16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F).astype(np.float16)


def _abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the largest |x| over axis 0, the signed x where it first occurs), as C's ``if (ax > amax)`` loop finds them."""
    where = np.abs(x).argmax(axis=0)
    signed = np.take_along_axis(x, where[None], axis=0)[0]
    return np.abs(signed), signed


# ---------------------------------------------------------------- the per-group searches (make_*_quants)


def _qkx(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants / make_qkx3_quants over groups in columns: x, weights [n, groups]; (scale, the_min, L).

    The levels of the best step are not copied at every step: the step's (iscale, min) are kept per group and its
    levels computed again at the end (the same operations on the same values give the same levels)."""
    low = first_low = np.minimum(x.min(axis=0), F(0))
    high = x.max(axis=0)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)
    flat = high <= low
    aux, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def error(s, m, lv):
        np.multiply(s, lv, out=tmp)
        np.add(tmp, m, out=tmp)
        np.subtract(tmp, x, out=tmp)
        if use_mad:
            np.abs(tmp, out=tmp)
        else:
            np.multiply(tmp, tmp, out=tmp)
        np.multiply(tmp, weights, out=tmp)
        return _sum(tmp)

    def levels_for(iscale, low):
        np.subtract(x, low, out=aux)
        np.multiply(aux, iscale, out=aux)
        return _levels(aux, 0, nmax)

    first_iscale = F(nmax) / (high - low)
    scale = F(1) / first_iscale
    best = error(scale, low, levels_for(first_iscale, low))
    best_iscale, best_low = first_iscale, low
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (high - low)
        levels_for(iscale, low)
        np.multiply(weights, aux, out=wl)
        sum_l = _sum(wl)
        sum_l2 = _sum(np.multiply(wl, aux, out=tmp))
        sum_xl = _sum(np.multiply(wl, x, out=tmp))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, F(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        current = error(this_scale, this_min, aux)
        better = (det > 0) & (current < best)
        if better.any():
            best = np.where(better, current, best)
            scale = np.where(better, this_scale, scale)
            best_iscale = np.where(better, iscale, best_iscale)
            best_low = np.where(better, low, best_low)  # the min these levels were computed from
            low = np.where(better, this_min, low)
    levels = levels_for(best_iscale, best_low)
    levels = np.where(flat, F(0), levels).astype(np.int32)
    return np.where(flat, F(0), scale), -np.where(flat, first_low, low), levels


def _qx(x, nmax, weights=None):
    """make_qx_quants with rmse_type 1: x [n, groups]; (scale, L in 0..2*nmax-1). As in _qkx, the best step's levels
    are computed again at the end from its iscale rather than copied at every step."""
    amax, peak = _abs_max(x)
    zero = amax < _EPS
    w = x * x if weights is None else weights
    wx = w * x
    lf, tmp = np.empty_like(x), np.empty_like(x)

    def search(iscale):
        np.multiply(iscale, x, out=lf)
        _levels(lf, -nmax, nmax - 1)
        sumlx = _sum(np.multiply(wx, lf, out=tmp))
        np.multiply(w, lf, out=tmp)
        return sumlx, _sum(np.multiply(tmp, lf, out=tmp))

    best_iscale = F(-nmax) / peak
    sumlx, suml2 = search(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / peak
        sumlx, suml2 = search(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            new_scale = sumlx / suml2
            best_iscale = np.where(better, iscale, best_iscale)
            scale = np.where(better, new_scale, scale)
            best = np.where(better, new_scale * sumlx, best)
    np.multiply(best_iscale, x, out=lf)
    levels = _levels(lf, -nmax, nmax - 1)
    return np.where(zero, F(0), scale), np.where(zero, 0, levels.astype(np.int32) + nmax)


def _q3(x, nmax):
    """make_q3_quants with do_rmse: x [n, groups]; (scale, L in 0..2*nmax-1)."""
    amax, peak = _abs_max(x)
    zero = amax < _EPS
    levels = _clip(_nearest(F(-nmax) / peak * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = levels.astype(F)
    sumlx, suml2 = _sum(wx * lf), _sum(w * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            cur = levels[i].astype(F)
            slx = sumlx - wx[i] * cur
            sl2 = suml2 - w[i] * cur * cur
            new = _clip(_nearest(x[i] * sl2 / slx), -nmax, nmax - 1)
            take = (slx > 0) & (new != levels[i])
            newf = new.astype(F)
            slx = slx + wx[i] * newf
            sl2 = sl2 + w[i] * newf * newf
            take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = np.where(take, new, levels[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    return np.where(zero, F(0), scale), np.where(zero, 0, levels + nmax)


def _qp(x, nmax, weights):
    """make_qp_quants: non-negative x [n, groups] with weights; (scale, L in 0..nmax)."""
    peak = np.maximum(x.max(axis=0), F(0))
    zero = peak < _EPS
    iscale = F(nmax) / peak
    levels = _nearest(iscale * x)
    scale = F(1) / iscale

    def mse(s, lv):
        diff = x - s * lv.astype(F)
        return _sum(weights * diff * diff)

    best = mse(scale, levels)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (F(0.1) * F(step) + F(nmax)) / peak
        current = mse(F(1) / iscale_step, np.minimum(nmax, _nearest(iscale_step * x)))
        better = current < best
        best = np.where(better, current, best)
        iscale = np.where(better, iscale_step, iscale)
    levels = np.minimum(nmax, _nearest(iscale * x))
    wx = weights * x
    lf = levels.astype(F)
    sumlx, suml2 = _sum(wx * lf), _sum(weights * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            cur = levels[i].astype(F)
            slx = sumlx - wx[i] * cur
            sl2 = suml2 - weights[i] * cur * cur
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, _nearest(x[i] * sl2 / slx))
            newf = new.astype(F)
            slx = slx + wx[i] * newf
            sl2 = sl2 + weights[i] * newf * newf
            take = ok & (new != levels[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = np.where(take, new, levels[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    return np.where(zero, F(0), scale), np.where(zero, 0, levels)


# ---------------------------------------------------------------- packing


def _groups(blocks: np.ndarray, size: int) -> np.ndarray:
    """[blocks, 256] -> [size, blocks * 256 / size]: each column one group of ``size`` consecutive values."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def _ungroup(columns: np.ndarray, blocks: int) -> np.ndarray:
    return columns.T.reshape(blocks, QK_K)


def _half_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (the layout get_scale_min_k4 reads)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _unpack_scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((packed.shape[0], 8), dtype=np.int32)
    mn = np.empty_like(sc)
    sc[:, :4], mn[:, :4] = packed[:, 0:4] & 63, packed[:, 4:8] & 63
    sc[:, 4:] = (packed[:, 8:12] & 0xF) | ((packed[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)
    return sc, mn


def _two_bit(levels: np.ndarray) -> np.ndarray:
    """[blocks, 256] values 0..3 -> 64 bytes: per half, byte l holds l, l+32, l+64, l+96."""
    q = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _requantize(x, d, m, levels, top):
    """Levels again from the stored (fp16) super-block scales: l = round((x + m) / d) in 0..top, where d != 0."""
    new = _clip(_nearest((x + m) / d), 0, top)
    return np.where(d != 0, new, levels)


# ---------------------------------------------------------------- the block formats


def _sigma2(blocks: np.ndarray, factor: int) -> np.ndarray:
    return F(factor) * _sum(np.ascontiguousarray(blocks.T) * np.ascontiguousarray(blocks.T)) / F(QK_K)


def _q4_q5_k(blocks, imatrix, nmax):
    nb = blocks.shape[0]
    x = _groups(blocks, 32)
    if imatrix is None:
        av = np.sqrt(_sum(x * x) / F(32))
        weights = av + np.abs(x)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, levels = _qkx(x, weights, nmax, rmin, rdelta, nstep, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(axis=1), F(0))
        max_min = np.maximum(mins.max(axis=1), F(0))
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
        ls = np.minimum(63, _nearest(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, _nearest(inv_min[:, None] * mins) & 0xFF)
        d, dmin = _f16(max_scale / F(63)), _f16(max_min / F(63))
    else:
        sigma2 = _sigma2(blocks, 2)
        qw = _groups(imatrix, 32)
        weights = qw * np.sqrt(np.repeat(sigma2, 8)[None] + x * x)
        sw = _sum(weights)
        scales, mins, levels = _qkx(x, weights, nmax, -0.9, 0.05, 36, False)
        sw8 = np.ascontiguousarray(sw.reshape(nb, 8).T)
        d_block, ls = _qp(np.ascontiguousarray(scales.reshape(nb, 8).T), 63, sw8)
        m_block, lm = _qp(np.ascontiguousarray(mins.reshape(nb, 8).T), 63, sw8)
        ls, lm = ls.T & 0xFF, lm.T & 0xFF
        if nmax == 31:
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d, dmin = _f16(d_block), _f16(m_block)
    packed = _pack_scale_min_k4(ls, lm)
    sc, mn = _unpack_scale_min_k4(packed)
    dj = (d.astype(F)[:, None] * sc.astype(F)).reshape(-1)
    mj = (dmin.astype(F)[:, None] * mn.astype(F)).reshape(-1)
    levels = _ungroup(_requantize(x, dj, mj, levels, nmax), nb).reshape(nb, 4, 2, 32).astype(np.uint8)
    head = np.concatenate([_half_bytes(d), _half_bytes(dmin), packed], axis=1)
    if nmax == 15:
        qs = (levels[:, :, 0] | (levels[:, :, 1] << 4)).reshape(nb, 128)
        return np.concatenate([head, qs], axis=1)
    low, high = levels[:, :, 0], levels[:, :, 1]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = (((low >> 4) << shifts) | ((high >> 4) << (shifts + 1))).astype(np.uint8)
    qh = np.bitwise_or.reduce(qh, axis=1)
    qs = ((low & 0xF) | ((high & 0xF) << 4)).reshape(nb, 128)
    return np.concatenate([head, qh, qs], axis=1)


def _q6_k(blocks, imatrix):
    nb = blocks.shape[0]
    x = _groups(blocks, 16)
    scales, levels = _qx(x, 32, None if imatrix is None else _groups(imatrix, 16))
    scales = scales.reshape(nb, 16)
    amax, peak = _abs_max(np.ascontiguousarray(scales.T))
    zero = amax < _EPS
    iscale = F(-128) / peak
    d = _f16(F(1) / iscale)
    sc = np.minimum(127, _nearest(iscale[:, None] * scales))
    dj = (d.astype(F)[:, None] * sc.astype(F)).reshape(-1)
    new = _clip(_nearest(x / dj), -32, 31) + 32
    levels = _ungroup(np.where(dj != 0, new, levels), nb).reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate(
        [
            levels[:, :, 0] & 0xF | ((levels[:, :, 2] & 0xF) << 4),
            levels[:, :, 1] & 0xF | ((levels[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(nb, 128)
    hi = levels >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _half_bytes(d)], axis=1)
    out[zero] = 0
    return out


def _q3_scales(l6: np.ndarray) -> np.ndarray:
    """16 six-bit scales (0..63) -> 12 bytes as quantize_row_q3_K packs them."""
    l6 = l6.astype(np.uint8)
    out = np.zeros((l6.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    high = (l6 >> 4).reshape(-1, 4, 4)  # [j // 4, j % 4]
    out[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def _q3_k(blocks, imatrix):
    nb = blocks.shape[0]
    x = _groups(blocks, 16)
    if imatrix is None:
        scales, levels = _q3(x, 4)
        scales = scales.reshape(nb, 16)
        _, peak = _abs_max(np.ascontiguousarray(scales.T))
        iscale = F(-32) / peak
        l8 = ((_nearest(iscale[:, None] * scales) + 128) & 0xFF) - 128  # stored in an int8
        l6 = _clip(l8, -32, 31) + 32
        has = peak != 0
        l6 = np.where(has[:, None], l6, 0)
        d = np.where(has, _f16(F(1) / iscale), np.float16(0))
        packed = np.where(has[:, None], _q3_scales(l6), 0).astype(np.uint8)
    else:
        sigma2 = _sigma2(blocks, 2)
        weights = _groups(imatrix, 16) * np.sqrt(np.repeat(sigma2, 16)[None] + x * x)
        sw = _sum(weights)
        scales, levels = _qx(x, 4, weights)
        d_block, l6 = _qx(
            np.ascontiguousarray(scales.reshape(nb, 16).T), 32, np.ascontiguousarray(sw.reshape(nb, 16).T)
        )
        l6 = l6.T
        packed = _q3_scales(l6)
        d = _f16(d_block)
    dj = (d.astype(F)[:, None] * (l6 - 32).astype(F)).reshape(-1)
    new = _clip(_nearest(x / dj), -4, 3) + 4
    levels = _ungroup(np.where(dj != 0, new, levels), nb).astype(np.uint8)
    bits = (levels > 3).reshape(nb, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(bits, axis=1)
    return np.concatenate([hmask, _two_bit(levels & 3), packed, _half_bytes(d)], axis=1)


def _q2_k(blocks, imatrix):
    nb = blocks.shape[0]
    x = _groups(blocks, 16)
    if imatrix is None:
        scales, mins, levels = _qkx(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = np.maximum(scales.max(axis=1), F(0))
        max_min = np.maximum(mins.max(axis=1), F(0))
        has_scale, has_min = max_scale > 0, max_min > 0
        ls = np.where(has_scale[:, None], _nearest((F(15) / max_scale)[:, None] * scales) & 0xFF, 0)
        lm = np.where(has_min[:, None], (_nearest((F(15) / max_min)[:, None] * mins) << 4) & 0xFF, 0)
        packed = (ls | lm).astype(np.uint8)
        d = np.where(has_scale, _f16(max_scale / F(15)), np.float16(0))
        dmin = np.where(has_min, _f16(max_min / F(15)), np.float16(0))
    else:
        sigma2 = _sigma2(blocks, 1)
        weights = _groups(imatrix, 16) * np.sqrt(np.repeat(sigma2, 16)[None] + x * x)
        sw = np.ascontiguousarray(_sum(weights).reshape(nb, 16).T)
        scales, mins, levels = _qkx(x, weights, 3, -0.9, 0.05, 36, False)
        dm, ls = _qp(np.ascontiguousarray(scales.reshape(nb, 16).T), 15, sw)
        mm, lm = _qp(np.ascontiguousarray(mins.reshape(nb, 16).T), 15, sw)
        packed = ((ls.T | (lm.T << 4)) & 0xFF).astype(np.uint8)
        d, dmin = _f16(dm), _f16(mm)
    dj = (d.astype(F)[:, None] * (packed & 0xF).astype(F)).reshape(-1)
    mj = (dmin.astype(F)[:, None] * (packed >> 4).astype(F)).reshape(-1)
    levels = _ungroup(_requantize(x, dj, mj, levels, 3), nb)
    return np.concatenate([packed, _two_bit(levels), _half_bytes(d), _half_bytes(dmin)], axis=1)


def _row_sigma2(blocks: np.ndarray, columns: int) -> np.ndarray:
    """sum(x * x) / n_per_row of each row (the legacy types' *_impl), repeated for each of its 32-value blocks."""
    rows = blocks.reshape(-1, columns)
    sigma2 = _sum(np.ascontiguousarray(rows.T) * np.ascontiguousarray(rows.T)) / F(columns)
    return np.repeat(sigma2, columns // 32)


def _legacy(blocks, imatrix, columns, kind):
    """q4_0, q4_1, q5_0, q5_1 with an importance matrix (quantize_row_qN_M_impl): one 32-value block per column."""
    x = np.ascontiguousarray(blocks.reshape(-1, 32).T)
    weights = np.ascontiguousarray(imatrix.reshape(-1, 32).T) * np.sqrt(_row_sigma2(blocks, columns)[None] + x * x)
    if kind in ("q4_0", "q5_0"):
        nmax = 8 if kind == "q4_0" else 16
        d, levels = _qx(x, nmax, weights)
        head = _half_bytes(_f16(d))
    else:
        d, the_min, levels = _qkx(x, weights, 15 if kind == "q4_1" else 31, -0.9, 0.05, 36, False)
        head = np.concatenate([_half_bytes(_f16(d)), _half_bytes(_f16(-the_min))], axis=1)
    levels = levels.T.astype(np.uint8)  # [blocks, 32]
    low, high = levels[:, :16], levels[:, 16:]
    qs = (low & 0xF) | ((high & 0xF) << 4)
    if kind in ("q4_0", "q4_1"):
        return np.concatenate([head, qs], axis=1)
    bits = ((levels >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)[None]
    qh = np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.concatenate([head, qh, qs], axis=1)


_QUANTIZERS = {
    "q2_k": _q2_k,
    "q3_k": _q3_k,
    "q4_k": lambda b, w: _q4_q5_k(b, w, 15),
    "q5_k": lambda b, w: _q4_q5_k(b, w, 31),
    "q6_k": _q6_k,
}


def quantize(rows: np.ndarray, k_type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows [n, columns] as ``k_type`` blocks: uint8 [n, row_bytes]. ``imatrix`` holds one importance per column
    (llama.cpp's quant_weights); without it the reference (data-free) algorithm runs. K-quants need columns in whole
    256-value blocks; the legacy types (q4_0 ... q5_1, 32-value blocks) are done here only with an importance matrix
    (without one, gguf.quants has them)."""
    rows = np.ascontiguousarray(rows, dtype=F)
    count, columns = rows.shape
    if columns % BLOCK_VALUES[k_type]:
        raise ValueError(f"{k_type} needs rows of whole {BLOCK_VALUES[k_type]}-value blocks, not {columns} values")
    weights = None
    if imatrix is not None:
        weights = np.broadcast_to(np.asarray(imatrix, dtype=F).reshape(1, -1), (count, columns))
    with np.errstate(all="ignore"):
        if k_type in LEGACY_BYTES:
            if weights is None:
                raise ValueError(f"{k_type} without an importance matrix is gguf.quants' to do")
            out = _legacy(rows, np.ascontiguousarray(weights), columns, k_type)
        else:
            out = _QUANTIZERS[k_type](rows.reshape(-1, QK_K), None if weights is None else weights.reshape(-1, QK_K))
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(count, row_bytes(k_type, columns))

"""The GPTQ int32 layout, bit for bit, and QuantLinear computing what the codes stand for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from quantkit.gptq.algorithm import QuantSpec, gptq_fast, rtn_quantize
from quantkit.gptq.pack import (
    pack_cols,
    pack_result,
    pack_rows,
    unpack_cols,
    unpack_rows,
    unpack_weight,
    unpack_zeros,
)
from quantkit.gptq.qlinear import QuantLinear
from tests.test_gptq_algorithm import correlated_hessian


def autogptq_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """auto-gptq's packer, transcribed from its documented loops (uint32, one row at a time)."""
    codes = codes.astype(np.uint32)
    out = np.zeros((codes.shape[0] * bits // 32, codes.shape[1]), dtype=np.uint32)
    if bits in (2, 4, 8):
        per = 32 // bits
        for row in range(out.shape[0]):
            for j in range(per):
                out[row] |= codes[row * per + j] << (bits * j)
        return out
    i = row = 0
    while row < out.shape[0]:
        for j in range(10):
            out[row] |= codes[i + j] << (3 * j)
        i += 10
        out[row] |= codes[i] << 30
        row += 1
        out[row] |= (codes[i] >> 2) & 1
        i += 1
        for j in range(10):
            out[row] |= codes[i + j] << (3 * j + 1)
        i += 10
        out[row] |= codes[i] << 31
        row += 1
        out[row] |= (codes[i] >> 1) & 0x3
        i += 1
        for j in range(10):
            out[row] |= codes[i + j] << (3 * j + 2)
        i += 10
        row += 1
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_autogptq_layout_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 40), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    expected = autogptq_pack(codes.numpy(), bits).view(np.int32)
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_rows(packed, bits).long(), codes)
    zeros = torch.randint(0, 2**bits, (3, 64), generator=g)
    assert pack_cols(zeros, bits).shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_cols(pack_cols(zeros, bits), bits).long(), zeros)


def _quantized(spec: QuantSpec, rows: int = 64, columns: int = 256):
    hessian = correlated_hessian(columns, seed=11)
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(12)) * 0.02
    return gptq_fast([w], hessian, spec)[0]


CASES = {
    "4bit-sym": QuantSpec(),
    "4bit-act-order": QuantSpec(group_size=64, desc_act=True),
    "3bit-asym": QuantSpec(bits=3, group_size=64, sym=False),
    "2bit-per-channel": QuantSpec(bits=2, group_size=-1),
    "8bit-asym": QuantSpec(bits=8, group_size=32, sym=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_quant_linear_computes_the_dequantized_weight(name):
    spec = CASES[name]
    result = _quantized(spec)
    packed = pack_result(result, spec.bits)
    # v1 stores zero points minus one; they must all be representable.
    stored = unpack_cols(packed.qzeros, spec.bits)
    assert torch.equal(stored + 1, result.zeros.to(stored.dtype))
    assert packed.scales.dtype == torch.float16 and packed.g_idx.dtype == torch.int32
    assert torch.equal(unpack_weight(packed, spec.bits, offset=1), result.dequantize())

    rows, columns = result.codes.shape
    layer = QuantLinear(columns, rows, bits=spec.bits, group_size=spec.group_size, bias=True,
                        dtype=torch.float32)
    layer.load_state_dict({"qweight": packed.qweight, "qzeros": packed.qzeros,
                           "scales": packed.scales, "g_idx": packed.g_idx,
                           "bias": torch.linspace(-1, 1, rows)})
    x = torch.randn(3, 5, columns, generator=torch.Generator().manual_seed(0))
    expected = F.linear(x, result.dequantize(), torch.linspace(-1, 1, rows))
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_v2_zero_points_are_read_as_stored():
    spec = QuantSpec(bits=4, group_size=64, sym=False)
    result = _quantized(spec)
    v2 = pack_result(result, 4, checkpoint_format="gptq_v2")
    assert torch.equal(unpack_cols(v2.qzeros, 4), result.zeros)
    assert torch.equal(unpack_weight(v2, 4, offset=0), result.dequantize())


@pytest.mark.parametrize("desc_act", [False, True])
def test_int4_kernel_layout_matches_dequantization(desc_act):
    """The repacking for PyTorch's tinygemm kernels (its CPU variant runs here)."""
    spec = QuantSpec(group_size=128, desc_act=desc_act)
    result = _quantized(spec, rows=64, columns=256)
    packed = pack_result(result, 4)
    layer = QuantLinear(256, 64, bits=4, group_size=128, bias=False, dtype=torch.bfloat16)
    layer.load_state_dict({"qweight": packed.qweight, "qzeros": packed.qzeros,
                           "scales": packed.scales, "g_idx": packed.g_idx})
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch build has no CPU int4 kernel")
    assert layer.enable_int4_kernel()
    assert (layer.int4_layout()["perm"] is not None) == desc_act
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = layer(x).float()
    expected = F.linear(x.float(), result.dequantize())
    assert float((got - expected).norm() / expected.norm()) < 1e-2


def test_rtn_packs_like_gptq():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    result = rtn_quantize(w, QuantSpec(bits=3, group_size=32, sym=False))
    packed = pack_result(result, 3)
    assert torch.equal(unpack_weight(packed, 3, offset=1), result.dequantize())


@pytest.mark.gpu
def test_int4_kernel_on_cuda_matches_dequantization():
    spec = QuantSpec(group_size=128, desc_act=True)
    result = _quantized(spec, rows=128, columns=256)
    packed = pack_result(result, 4)
    layer = QuantLinear(256, 128, bits=4, group_size=128, bias=False, dtype=torch.bfloat16)
    layer.load_state_dict({"qweight": packed.qweight, "qzeros": packed.qzeros,
                           "scales": packed.scales, "g_idx": packed.g_idx})
    layer.to("cuda")
    assert layer.enable_int4_kernel()
    x = torch.randn(6, 256, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x.float(), result.dequantize().cuda())
    assert float((layer(x).float() - expected).norm() / expected.norm()) < 1e-2


def gptqmodel_v1_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros as gptqmodel writes v1 (docs/interop.md): the v2 words minus 0x11111111-style
    constants as whole integers for 2/4/8 bits (a zero of 0 borrows from its neighbour),
    each field minus 1 modulo 8 for 3 bits."""
    if bits == 3:
        return pack_cols((zeros - 1) % 8, 3)
    v2 = pack_cols(zeros, bits).to(torch.int64) & 0xFFFFFFFF
    ones = sum(1 << (bits * k) for k in range(32 // bits))
    v1 = (v2 - ones) % 2**32
    return torch.where(v1 >= 2**31, v1 - 2**32, v1).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_points_of_zero_written_by_gptqmodel_read_back(bits):
    zeros = torch.randint(0, 2**bits, (4, 64), generator=torch.Generator().manual_seed(bits))
    zeros[:, :5] = 0  # the asymmetric case v1 cannot store field by field
    assert torch.equal(unpack_zeros(gptqmodel_v1_qzeros(zeros, bits), bits, 1).long(), zeros)
    assert torch.equal(unpack_zeros(pack_cols(zeros, bits), bits, 0).long(), zeros)

"""GPTQ's packed tensors rearranged into ONNX Runtime's `MatMulNBits` inputs, bit for bit.

The two formats store the same numbers differently. GPTQ packs codes into int32 along the
input dimension of a `[in, out]` matrix and names each input row's group in `g_idx`
(permuted under act-order); `MatMulNBits` packs codes into bytes along K of an `[N, K]`
matrix, in contiguous power-of-two blocks. Rearranging codes, scales and zero points -- never
recomputing them -- keeps the export exactly the quantization GPTQ chose:

- rows are sorted by group, so each group is contiguous; the same permutation is applied to
  the activations (a Gather) because ONNX Runtime's `g_idx` input is deprecated and its CPU
  kernel ignores it;
- a group becomes one or more blocks of the largest power of two (>= 16, <= 128) that divides
  every group boundary, each block repeating its group's scale and zero point;
- zero points that are all 2**(bits-1) (symmetric GPTQ) are left out: that is the operator's
  default, and its CPU kernel has a faster path without them.

Pure tensor code: no files, no flags, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import ConfigError
from quantkit.gptq.pack import PackedLinear, unpack_cols

SUPPORTED_BITS = (2, 4, 8)  # what MatMulNBits packs byte-aligned and ORT's CPU kernel runs
MIN_BLOCK, MAX_BLOCK = 16, 128


@dataclass(frozen=True)
class NBitsWeight:
    """The inputs and attributes of one `com.microsoft::MatMulNBits` node."""

    b: torch.Tensor  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: torch.Tensor  # [N, k_blocks], the activation dtype
    zero_points: torch.Tensor | None  # uint8 packed, float [N, k_blocks], or None (2**(bits-1))
    perm: torch.Tensor | None  # int64 [K]: activation columns in block order; None = identity
    k: int
    n: int
    bits: int
    block_size: int


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dim into uint8, low bits first; pads the dim with zeros."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    out = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        out |= codes[..., i] << (bits * i)
    return out


def unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bytes` (padding kept): uint8 [..., L] -> uint8 [..., L * 8 / bits]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def block_layout(g_idx: torch.Tensor) -> tuple[torch.Tensor | None, int, torch.Tensor]:
    """Order input rows by group and choose the block size.

    Returns (perm or None, block_size, group of each block). Raises when the groups cannot be
    cut into power-of-two blocks of at least 16 rows (e.g. a group size of 40).
    """
    k = g_idx.numel()
    order = torch.argsort(g_idx.to(torch.int64), stable=True)
    sorted_groups = g_idx[order].to(torch.int64)
    boundaries = (torch.nonzero(sorted_groups[1:] != sorted_groups[:-1]).flatten() + 1).tolist()
    block = MAX_BLOCK
    while block > MIN_BLOCK and block // 2 >= k:
        block //= 2  # a single small group: no point in padding past it
    while block >= MIN_BLOCK and any(b % block for b in boundaries):
        block //= 2
    if block < MIN_BLOCK:
        edges = [0, *boundaries, k]
        sizes = sorted({b - a for a, b in zip(edges[:-1], edges[1:], strict=True)})
        raise ConfigError(
            f"group sizes {sizes[:4]} cannot be cut into MatMulNBits blocks (a power of two "
            f">= {MIN_BLOCK}); re-quantize with --group-size 32, 64 or 128"
        )
    perm = None if torch.equal(order, torch.arange(k)) else order
    block_groups = sorted_groups[torch.arange(0, k, block)]
    return perm, block, block_groups


def gptq_to_nbits(packed: PackedLinear, bits: int, zero_offset: int,
                  dtype: torch.dtype) -> NBitsWeight:
    """Rearrange one GPTQ Linear into MatMulNBits inputs; `dtype` is the activation dtype.

    `zero_offset` is what loaders add to a stored zero: 1 for v1 ("gptq"), 0 for "gptq_v2".
    """
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"GPTQ bits={bits}: MatMulNBits runs "
                          f"{'/'.join(map(str, SUPPORTED_BITS))}-bit weights")
    g_idx, scales = packed.g_idx, packed.scales
    k, (groups, n) = g_idx.numel(), scales.shape
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ConfigError(f"g_idx names groups outside 0..{groups - 1}; the checkpoint is "
                          "damaged")
    zeros = unpack_cols(packed.qzeros, bits)[:, :n] + zero_offset  # [G, N]
    perm, block, block_groups = block_layout(g_idx)
    k_blocks = block_groups.numel()
    return NBitsWeight(
        b=_blocks_of_codes(packed.qweight, bits, k, n, perm, block, k_blocks),
        scales=scales[block_groups].T.contiguous().to(dtype),
        zero_points=_zero_points(zeros[block_groups].T.contiguous(), bits, dtype),
        perm=perm, k=k, n=n, bits=bits, block_size=block,
    )


def _blocks_of_codes(qweight: torch.Tensor, bits: int, k: int, n: int,
                     perm: torch.Tensor | None, block: int, k_blocks: int) -> torch.Tensor:
    """B for MatMulNBits: codes [N, k_blocks, block * bits / 8], packed low bits first.

    A GPTQ int32 word holds consecutive input rows lowest bits first, so its bytes, lowest
    first, already are MatMulNBits' bytes: transposing the words and splitting them into bytes
    is the whole conversion. Act-order (rows to reorder) or a partial last block needs the
    codes unpacked from those bytes, permuted and packed again.
    """
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=qweight.device)
    as_bytes = ((qweight.T.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(n, -1)
    if perm is None and k == k_blocks * block:
        return as_bytes.reshape(n, k_blocks, block * bits // 8)
    codes = unpack_bytes(as_bytes, bits)[:, :k]  # [N, K]
    if perm is not None:
        codes = codes[:, perm]
    codes = torch.nn.functional.pad(codes, (0, k_blocks * block - k))
    return pack_bytes(codes.reshape(n, k_blocks, block), bits)


def _zero_points(zeros: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Omitted when all are the default; packed like B when they fit in `bits`.

    A v1 checkpoint cannot store a zero of 0 (it stores zero - 1), so loaders read it back as
    2**bits; that value does not fit the packed format and goes in as float, which ORT's CPU
    kernel accepts for 2- and 4-bit weights.
    """
    if bool((zeros == 1 << (bits - 1)).all()):
        return None
    if int(zeros.max()) < 1 << bits:
        return pack_bytes(zeros, bits)
    if bits < 8:
        return zeros.to(dtype)
    raise ConfigError("8-bit GPTQ zero point 256 (a v1 checkpoint's wrapped zero of 0) has no "
                      "MatMulNBits encoding; re-quantize with --sym or save as gptq_v2")


def dequantize_blocks(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                      k: int, bits: int, block_size: int) -> torch.Tensor:
    """What MatMulNBits computes as its weight, [N, K] in float32 (rows in block order)."""
    n, k_blocks, _ = b.shape
    codes = unpack_bytes(b, bits).float()  # [N, k_blocks, block_size]
    if zero_points is None:
        zeros = torch.full((n, k_blocks), float(1 << (bits - 1)))
    elif zero_points.dtype == torch.uint8:
        zeros = unpack_bytes(zero_points, bits)[:, :k_blocks].float()
    else:
        zeros = zero_points.float()
    weight = (codes - zeros.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return weight.reshape(n, k_blocks * block_size)[:, :k]

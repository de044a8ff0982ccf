"""GPTQ codes to and from the int32 checkpoint layout, vectorized.

The layout every GPTQ loader reads (auto-gptq, gptqmodel, vLLM, exllamav2):

- `qweight` int32 `[in * bits / 32, out]`: codes packed along the input dimension;
- `qzeros` int32 `[groups, out * bits / 32]`: zero points packed along the output dimension,
  stored minus one in v1 (`checkpoint_format: "gptq"`), as they are in `"gptq_v2"`;
- `scales` float16 `[groups, out]`; `g_idx` int32 `[in]`.

Codes form one little-endian bit stream per column: code k sits at bits `k*bits` onwards,
lowest bits first. For 2, 4 and 8 bits that is plain shift-and-or within each word; for
3 bits, 32 codes fill three words and codes 10 and 21 straddle a word boundary, exactly
as auto-gptq's packer lays them out. Both directions loop over the positions of one chunk
(at most 32), never over rows, so packing a 7B model takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.gptq.algorithm import QuantResult

FORMATS = ("gptq", "gptq_v2")


def zero_offset(checkpoint_format: str) -> int:
    """What a loader adds to a stored zero point: 1 for v1 ("gptq"), 0 for "gptq_v2"."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected one of {FORMATS}")
    return 1 if checkpoint_format == "gptq" else 0


def chunk_shape(bits: int) -> tuple[int, int]:
    """(codes, int32 words) of the smallest whole unit: 32 codes in 3 words for 3 bits."""
    return (32, 3) if 32 % bits else (32 // bits, 1)


def _positions(bits: int):
    """For each code of a chunk: (index, word, shift, bits spilling into the next word)."""
    for k in range(chunk_shape(bits)[0]):
        word, shift = divmod(k * bits, 32)
        yield k, word, shift, max(0, shift + bits - 32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes `[n, cols]` along dim 0 into int32 `[n * bits / 32, cols]`."""
    n, cols = values.shape
    per_chunk, words_per_chunk = chunk_shape(bits)
    if n % per_chunk:
        raise ValueError(f"cannot pack {n} rows of {bits}-bit codes: not a multiple of "
                         f"{per_chunk}")
    chunks = n // per_chunk
    v = values.to(torch.int64).reshape(chunks, per_chunk, cols)
    words = torch.zeros((chunks, words_per_chunk, cols), dtype=torch.int64,
                        device=values.device)
    for k, word, shift, spill in _positions(bits):
        words[:, word] |= (v[:, k] << shift) & 0xFFFFFFFF
        if spill:
            words[:, word + 1] |= v[:, k] >> (bits - spill)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.reshape(chunks * words_per_chunk, cols).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 `[n * bits / 32, cols]` -> int32 codes `[n, cols]`."""
    rows, cols = packed.shape
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return codes.reshape(rows * (32 // bits), cols)
    per_chunk, words_per_chunk = chunk_shape(bits)
    if rows % words_per_chunk:
        raise ValueError(f"{rows} packed rows is not a whole number of {bits}-bit chunks")
    words = packed.reshape(rows // words_per_chunk, words_per_chunk, cols)
    codes = torch.empty((rows // words_per_chunk, per_chunk, cols), dtype=torch.int32,
                        device=packed.device)
    for k, word, shift, spill in _positions(bits):
        # Arithmetic right shifts smear the sign bit; the masks keep only this code's bits.
        if spill:
            low_bits = bits - spill
            code = (words[:, word] >> shift) & ((1 << low_bits) - 1)
            code |= (words[:, word + 1] << low_bits) & mask
        else:
            code = (words[:, word] >> shift) & mask
        codes[:, k] = code
    return codes.reshape(rows // words_per_chunk * per_chunk, cols)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[rows, n]` along dim 1 (how qzeros are stored)."""
    return pack_rows(values.T, bits).T.contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.T.contiguous(), bits).T.contiguous()


@dataclass
class PackedLinear:
    """The tensors one quantized Linear contributes to a checkpoint."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def named_tensors(self, module: str) -> list[tuple[str, torch.Tensor]]:
        return [(f"{module}.qweight", self.qweight), (f"{module}.qzeros", self.qzeros),
                (f"{module}.scales", self.scales), (f"{module}.g_idx", self.g_idx)]

    def to(self, device) -> PackedLinear:
        return PackedLinear(self.qweight.to(device), self.qzeros.to(device),
                            self.scales.to(device), self.g_idx.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.qzeros, self.scales, self.g_idx))


def check_packable(out_features: int, in_features: int, bits: int) -> str | None:
    """Why a `[out, in]` matrix cannot be stored at `bits`, or None when it can."""
    per_chunk = chunk_shape(bits)[0]
    for what, size in (("input", in_features), ("output", out_features)):
        if size % per_chunk:
            return (f"its {what} size {size} does not pack into whole int32 words "
                    f"(needs a multiple of {per_chunk})")
    return None


def pack_result(result: QuantResult, bits: int, checkpoint_format: str = "gptq") -> PackedLinear:
    """A solver's result in the checkpoint layout (on the result's device)."""
    zeros = result.zeros.to(torch.int64) - zero_offset(checkpoint_format)
    if bool((zeros < 0).any()):
        raise ValueError("a zero point of 0 cannot be stored in the v1 format")
    return PackedLinear(
        qweight=pack_rows(result.codes.T, bits),
        qzeros=pack_cols(zeros, bits),
        scales=result.scales.to(torch.float16).contiguous(),
        g_idx=result.g_idx.to(torch.int32).contiguous(),
    )


def add_one_per_word(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """2/4/8-bit v1 -> v2 zero points: add 1 to every field as one int32 addition.

    Writers store v1 by subtracting 1 from the packed integer, not field by field, so a zero
    point of 0 becomes an all-ones field that borrowed from its neighbour (gptqmodel writes
    such files for --asym). Adding back the same way, carries included, undoes it exactly;
    where no field was 0 it is the same as adding 1 to each field.
    """
    ones = sum(1 << (bits * k) for k in range(32 // bits))
    words = (qzeros.to(torch.int64) & 0xFFFFFFFF) + ones
    words &= 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_zeros(qzeros: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    """Zero points `[groups, out]` from qzeros stored with `offset` (1 for v1, 0 for v2).

    3-bit fields straddle words; gptqmodel's writer subtracts 1 from each of them modulo 8,
    so that is how they are read back.
    """
    if not offset:
        return unpack_cols(qzeros, bits)
    if 32 % bits:
        return (unpack_cols(qzeros, bits) + 1) & ((1 << bits) - 1)
    return unpack_cols(add_one_per_word(qzeros, bits), bits)


def unpack_weight(packed: PackedLinear, bits: int, offset: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `[out, in]` a packed Linear stands for, computed in float32."""
    codes = unpack_rows(packed.qweight, bits)  # [in, out]
    zeros = unpack_zeros(packed.qzeros, bits, offset).float()  # [groups, out]
    scales = packed.scales.float()
    columns, groups = codes.shape[0], zeros.shape[0]
    if _consecutive_groups(packed.g_idx, groups):
        # Groups are runs of equal length: broadcast each group's grid instead of gathering
        # one row per input (4x faster on CPU, where eval dequantizes every forward).
        weight_t = codes.view(groups, columns // groups, -1).float()
        weight_t.sub_(zeros[:, None]).mul_(scales[:, None])
        weight_t = weight_t.view(columns, -1)
    else:
        g = packed.g_idx.long()
        weight_t = (codes.float() - zeros[g]) * scales[g]
    return weight_t.T.to(dtype)


def _consecutive_groups(g_idx: torch.Tensor, groups: int) -> bool:
    columns = g_idx.numel()
    if columns % groups:
        return False
    expected = torch.arange(columns, device=g_idx.device) // (columns // groups)
    return torch.equal(g_idx.long(), expected)

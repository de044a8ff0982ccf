"""Trace a causal LM into an ONNX graph whose quantized Linears are `MatMulNBits` nodes.

Quantized Linears are swapped for `NBitsLinear`, a module calling the custom op
`quantkit::matmul_nbits` on the already rearranged packed tensors; the exporter translates that
op straight into `com.microsoft::MatMulNBits`. So the graph is built from the packed weights
and never holds a float copy of them (a 7B model dequantized to fp32 would be 28 GB and need
graph surgery afterwards), and nothing depends on the names the exporter gives initializers.

The exporter is torch's dynamo-based `torch.onnx.export(..., dynamo=True)`: the TorchScript
exporter is deprecated since torch 2.9 and bakes Python-side shape checks of transformers'
masking code into the trace as constants.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quantkit.onnx_export.nbits import NBitsWeight, dequantize_blocks

MSFT_DOMAIN = "com.microsoft"
# The exporter's passes log every rewrite at INFO and warn about missing torchvision ops.
_CHATTY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


# ----------------------------------------------------------------------------- torch side


@torch.library.custom_op("quantkit::matmul_nbits", mutates_args=())
def matmul_nbits(a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None, k: int, n: int, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    """MatMulNBits in PyTorch: `a @ dequantized(b).T`, the reference the ONNX node must match."""
    weight = dequantize_blocks(b, scales, zero_points, k, bits, block_size)
    return (a.float() @ weight.T).to(a.dtype)


@matmul_nbits.register_fake
def _matmul_nbits_shape(a, b, scales, zero_points, k, n, bits, block_size, accuracy_level):
    return a.new_empty((*a.shape[:-1], n))


class NBitsLinear(nn.Module):
    """A Linear whose weight is held as MatMulNBits inputs (plus the act-order permutation)."""

    def __init__(self, weight: NBitsWeight, bias: torch.Tensor | None, accuracy_level: int):
        super().__init__()
        self.k, self.n, self.bits = weight.k, weight.n, weight.bits
        self.block_size, self.accuracy_level = weight.block_size, accuracy_level
        self.register_buffer("b", weight.b)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zero_points", weight.zero_points)
        self.register_buffer("perm", weight.perm)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        y = matmul_nbits(x, self.b, self.scales, self.zero_points, self.k, self.n, self.bits,
                         self.block_size, self.accuracy_level)
        return y if self.bias is None else y + self.bias


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits, no KV cache: the graph's whole interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits


# ----------------------------------------------------------------------------- ONNX side


def _register_matmul_nbits_schema() -> None:
    """Teach the onnx package the contrib op's signature; torch's exporter checks calls
    against a schema, and ONNX Runtime's contrib schemas are not in `onnx.defs`."""
    import onnx.defs as defs

    if defs.has("MatMulNBits", MSFT_DOMAIN):
        return
    schema, param = defs.OpSchema, defs.OpSchema.FormalParameter
    optional = schema.FormalParameterOption.Optional
    attr = schema.AttrType.INT
    floats = ["tensor(float)", "tensor(float16)"]
    defs.register_schema(schema(
        "MatMulNBits", MSFT_DOMAIN, 1, "ONNX Runtime contrib op (see its ContribOperators.md)",
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional),
                param("g_idx", "T4", param_option=optional),
                param("bias", "T1", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", *floats], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[schema.Attribute("K", attr), schema.Attribute("N", attr),
                    schema.Attribute("bits", attr), schema.Attribute("block_size", attr),
                    schema.Attribute("accuracy_level", attr, required=False)],
    ))


def _matmul_nbits_onnx(a, b, scales, zero_points, k: int, n: int, bits: int, block_size: int,
                       accuracy_level: int):
    from onnxscript.values import Op, Opset

    op = Op(Opset(MSFT_DOMAIN, 1), "MatMulNBits")
    inputs = (a, b, scales) if zero_points is None else (a, b, scales, zero_points)
    return op(*inputs, K=k, N=n, bits=bits, block_size=block_size,
              accuracy_level=accuracy_level)


def export_graph(model: nn.Module, example_ids: torch.Tensor, path: Path, opset: int) -> int:
    """Write `model` as `path` (.onnx, with a .onnx.data file beside it past 1.5 GB).

    Returns the opset actually written: when converting to the requested one fails, the
    exporter keeps its own (18) without raising.
    """
    _register_matmul_nbits_schema()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {0: batch, 1: sequence}
    # Tracing specializes any axis of size 1, so the example has two rows of >= 2 tokens.
    ids = example_ids[:1, :8].repeat(2, 1)
    if ids.shape[1] < 2:
        raise ValueError("export_graph needs example sequences of at least 2 tokens")
    example = (ids, torch.ones_like(ids))
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            LogitsOnly(model).eval(), example, dynamo=True, opset_version=opset,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
            custom_translation_table={torch.ops.quantkit.matmul_nbits.default:
                                      _matmul_nbits_onnx},
            optimize=True, verbose=False,
        )
    for node in program.model.graph.all_nodes():
        # Per-node stack traces and module paths: debugging aids that would ship local file
        # paths inside the artifact and add ~40% to a small model's file.
        node.metadata_props.clear()
    program.save(path)
    return program.model.opset_imports.get("", program.model.opset_imports.get("ai.onnx", 0))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's internal warnings and INFO chatter for one export."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree deprecations, axis renames: none actionable
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)

"""`quantkit export onnx MODEL OUT [--opset N] [--dtype fp32|fp16]`."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.errors import ConfigError
from quantkit.onnx_export import OnnxExportConfig, export_onnx
from quantkit.onnx_export.export import DEFAULT_OPSET, DTYPES, FORMATS


@click.command(name="export")
@click.argument("format_name", metavar="FORMAT")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset of the standard operators (18 or newer).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="Activations and float weights (GPTQ scales included).")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model's own Python code (Baichuan2, Aquila2, ...).")
@click.option("--force", is_flag=True, help="Replace an existing OUT folder.")
def command(format_name: str, model: str, out: str, opset: int, dtype: str,
            trust_remote_code: bool, force: bool) -> None:
    """Export MODEL (a BF16 checkpoint or a quantkit GPTQ artifact) as FORMAT into folder OUT.

    onnx: model.onnx with inputs input_ids and attention_mask (dynamic batch and sequence,
    no KV cache) and output logits. GPTQ Linears become ONNX Runtime MatMulNBits nodes carrying
    the artifact's own codes, scales and zero points. ONNX Runtime's logits are checked against
    the PyTorch model's on calibration text before anything is written.
    """
    if format_name not in FORMATS:
        raise ConfigError(f"export format {format_name!r}: quantkit exports "
                          f"{', '.join(FORMATS)} (e.g. quantkit export onnx MODEL OUT)")
    result = export_onnx(OnnxExportConfig(
        source=Path(model), dest=Path(out), opset=opset, dtype=dtype,
        trust_remote_code=trust_remote_code, force=force,
    ))
    summary, check = result.summary, result.summary["validation"]
    kind = (f"{summary['quantization']['bits']}-bit MatMulNBits, {summary['dtype']}"
            if summary["quantization"] else summary["dtype"])
    click.echo(f"wrote {result.dest} ({kind}, {summary['onnx_bytes'] / 1e6:.2f} MB; "
               f"max |logit diff| {check['max_abs_diff']:.2g}, top-1 agreement "
               f"{100 * check['top1_agreement']:.1f}%)")

"""`quantkit gptq MODEL --out DIR [--bits 4] [--group-size 128] ...`."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.compute import COMPUTE_DTYPES
from quantkit.gptq.algorithm import SCALE_SEARCHES
from quantkit.gptq.run import GPTQConfig, gptq_quantize
from quantkit.gptq.skip import parse_skip_modules


@click.command(name="gptq")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="Output folder (written atomically).")
@click.option("--bits", type=int, default=4, show_default=True, help="2, 3, 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Inputs sharing one scale: 32, 64 or 128; -1: one per output row.")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric grid (what vLLM's Marlin kernels need) or with zero points.")
@click.option("--desc-act", is_flag=True,
              help="Act-order: quantize inputs by decreasing activation energy.")
@click.option("--static-groups", is_flag=True,
              help="With --desc-act: fix each group's grid before the solve.")
@click.option("--group-aware/--no-group-aware", default=True, show_default=True,
              help="Quantize whole groups in order of activation energy (act-order that keeps "
                   "g_idx trivial); ignored with --desc-act.")
@click.option("--scale-search", type=click.Choice(list(SCALE_SEARCHES)), default="hessian",
              show_default=True,
              help="Each group's grid: min/max range, or the range that minimizes the "
                   "(Hessian-weighted) rounding error.")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Quantize a layer's Linears in forward order, each on quantized inputs.")
@click.option("--damp", type=float, default=0.05, show_default=True,
              help="Hessian damping (fraction of its mean diagonal); raised automatically "
                   "when Cholesky fails.")
@click.option("--calib", type=click.Path(path_type=str), default=None,
              help="Calibration text file.  [default: the mixed Chinese/English set in "
                   "calib_data/]")
@click.option("--calib-format", "calib_format",
              type=click.Choice(["auto", "text", "chat", "mixed"]), default="auto",
              show_default=True,
              help="text: prose; chat: instruction/response pairs rendered with the model's "
                   "chat template (with --calib: a .jsonl of messages or instruction/output); "
                   "mixed: half each. auto: chat for a --calib file of conversations, "
                   "else mixed for a model with a chat template, else text.")
@click.option("--nsamples", type=int, default=128, show_default=True,
              help="Calibration sequences.")
@click.option("--seqlen", type=int, default=2048, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--batch-size", type=int, default=None,
              help="Sequences per calibration forward.  [default: about 16k tokens]")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True)
@click.option("--compute-dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="auto",
              show_default=True,
              help="Calibration forwards' dtype; auto: fp32 on CPU, as stored (bf16) on CUDA "
                   "(Hessians are always fp32).")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model's own Python code (Baichuan2, Aquila2, ...).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="rtn: round-to-nearest on the same grid and format, the baseline GPTQ "
                   "is measured against.")
@click.option("--skip-modules", default=None,
              help="Comma-separated decoder-layer Linears to keep unquantized, by full name "
                   "or a dotted part of it (down_proj, mlp.down_proj, model.layers.0).")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--max-gpu-memory", default=None,
              help="GPU budget, e.g. 24GiB: calibration activations that do not fit stay in "
                   "host memory and move to the GPU one batch at a time.")
@click.option("--load", "load", type=click.Choice(["lazy", "whole"]), default="lazy",
              show_default=True,
              help="lazy: read one decoder layer at a time from the shards; whole: load the "
                   "model into host memory first.")
@click.option("--hessian-reduce", type=click.Choice(["allreduce", "owner"]),
              default="allreduce", show_default=True,
              help="Under torchrun: sum Hessians on every rank, or on the one rank that "
                   "solves each Linear group.")
def command(model: str, out: str, bits: int, group_size: int, sym: bool, desc_act: bool,
            static_groups: bool, group_aware: bool, scale_search: str, true_sequential: bool,
            damp: float, calib: str | None, calib_format: str, nsamples: int, seqlen: int,
            batch_size: int | None, device: str, compute_dtype: str,
            trust_remote_code: bool, method: str, force: bool, max_shard_size: str,
            max_gpu_memory: str | None, load: str, hessian_reduce: str,
            skip_modules: str | None) -> None:
    """Quantize MODEL with GPTQ into a folder every GPTQ loader reads.

    Only the decoder layer being quantized and the calibration activations are on the
    device, and (with --load lazy) in host memory. Several processes share the
    calibration rows when launched with `torchrun --nproc-per-node N -m quantkit gptq`.
    The output loads with transformers (optimum + gptqmodel), gptqmodel, vLLM, exllamav2 and
    `quantkit.load`; quantkit.json records each layer's output error next to
    round-to-nearest's.
    """
    cfg = GPTQConfig(
        source=Path(model), dest=Path(out), bits=bits, group_size=group_size, sym=sym,
        desc_act=desc_act, static_groups=static_groups, group_aware=group_aware,
        scale_search=scale_search, compute_dtype=compute_dtype,
        true_sequential=true_sequential, damp=damp,
        calib=Path(calib) if calib else None, calib_format=calib_format,
        nsamples=nsamples, seqlen=seqlen,
        batch_size=batch_size, device=device, trust_remote_code=trust_remote_code,
        force=force, max_shard_size=max_shard_size,
        solver="rtn" if method == "rtn" else "fast", max_gpu_memory=max_gpu_memory,
        load=load, hessian_reduce=hessian_reduce, skip_modules=parse_skip_modules(skip_modules),
    )
    result = gptq_quantize(cfg)
    if not result.is_main:
        return
    name = "round-to-nearest" if method == "rtn" else "GPTQ"
    click.echo(f"wrote {result.dest} ({name} {bits}-bit, group {group_size}, "
               f"{result.output_bytes / 1e6:.1f} MB, {result.seconds:.1f} s)")

"""`quantkit mem MODEL [--device cuda|cpu] [--seq-len 1024] [--out FILE.json]`."""

from __future__ import annotations

import json
from pathlib import Path

import click


def format_summary(result: dict) -> list[str]:
    r = result["results"]
    head = f"{result['model']['name']} ({result['model']['precision']}) on {r['device']}"
    if r["device"] == "cuda":
        lines = [f"  allocated after load  {r['allocated_after_load_gib']:.3f} GiB",
                 f"  peak, {result['settings']['seq_len']}-token forward  "
                 f"{r['peak_forward_gib']:.3f} GiB"]
    else:
        lines = [f"  weights in memory     {r['weights_in_memory_gib']:.4f} GiB",
                 f"  RSS growth after load {r['rss_after_load_gib']:.4f} GiB",
                 f"  peak RSS growth, {result['settings']['seq_len']}-token forward  "
                 f"{r['peak_rss_forward_gib']:.4f} GiB"]
    return [head, *lines, f"  load {r['load_seconds']:.2f} s, {r['weight_bytes']} weight bytes "
                          "on disk"]


@click.command(name="mem")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True)
@click.option("--seq-len", type=int, default=None,
              help="Tokens in the forward pass whose peak is measured. "
                   "[default: 1024, or the model's context if shorter]")
@click.option("--out", type=click.Path(path_type=Path), metavar="FILE.json",
              help="Write the result JSON here (atomically); default: print it.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=None,
              help="Unquantized models only. [default: as stored]")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model's own Python code (Baichuan2, ...).")
def command(model: Path, device: str, seq_len: int | None, out: Path | None, dtype: str | None,
            trust_remote_code: bool) -> None:
    """Memory after loading MODEL and at peak during one forward pass.

    CUDA: torch.cuda.memory_allocated after load (GiB, the measure of the Baichuan2 README
    table) and max_memory_allocated during the forward. CPU: resident-set growth and the
    exact in-memory size of the weights. Both record load time and bytes on disk.
    """
    from quantkit.checkpoint import check_file_destination
    from quantkit.evaluate.memory import MemConfig, measure_memory
    from quantkit.evaluate.provenance import write_result

    if out is not None:
        check_file_destination(out, inputs=[model])
    result = measure_memory(MemConfig(model=model, device=device, seq_len=seq_len, dtype=dtype,
                                      trust_remote_code=trust_remote_code))
    if out is None:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    write_result(out, result, inputs=[model])
    for line in format_summary(result):
        click.echo(line)
    click.echo(f"wrote {out}")

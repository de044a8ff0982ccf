"""`quantkit eval MODEL [--base BF16_MODEL] --tasks ppl,kld,ceval,cmmlu,mmlu --out FILE.json`."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.evaluate import TASKS


def format_summary(result: dict) -> list[str]:
    """One line per measure, for the terminal; the JSON holds everything."""
    lines = [f"{result['model']['name']} ({result['model']['precision']})"]
    for split, r in result["results"].get("ppl", {}).items():
        lines.append(f"  ppl {split}: {r['ppl']:.4f} ({r['tokens']} tokens)")
    for split, r in result["results"].get("kld", {}).items():
        lines.append(f"  kld {split}: mean {r['mean']:.6f}, p99 {r['p99']:.6f}, "
                     f"same top-1 {100 * r['same_top1']:.2f}%")
    for task in ("ceval", "cmmlu", "mmlu"):
        r = result["results"].get(task)
        if r:
            sample = " (shipped sample questions)" if r.get("sample_data") else ""
            lines.append(f"  {task}: {r['average']:.2f} average over {len(r['subjects'])} "
                         f"subjects, {r['questions']} questions{sample}")
    return lines


@click.command(name="eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="FILE.json",
              help="Result JSON (replaced atomically).")
@click.option("--base", type=click.Path(path_type=Path), metavar="BF16_MODEL",
              help="Unquantized model for kld (same tokenizer).")
@click.option("--tasks", default=None, metavar="LIST",
              help=f"Comma-separated, from {','.join(TASKS)}. "
                   "[default: ppl,ceval,cmmlu,mmlu, plus kld with --base]")
@click.option("--text", type=click.Path(path_type=Path), metavar="FILE",
              help="Held-out text for ppl/kld. [default: calib_data's held-out split, "
                   "Chinese and English reported separately]")
@click.option("--text-format", "text_format", type=click.Choice(["plain", "chat"]),
              default="plain", show_default=True,
              help="chat: held-out instruction/response pairs rendered with the model's chat "
                   "template (with --text: a .jsonl of messages or instruction/output), the "
                   "text users send; needs a tokenizer with a chat template.")
@click.option("--seqlen", type=int, help="Window length. [default: min(2048, model context)]")
@click.option("--stride", type=int,
              help="Tokens between window starts; only new tokens are scored. [default: seqlen]")
@click.option("--max-tokens", type=int, metavar="N",
              help="Use only the first N tokens of each held-out text (quick runs).")
@click.option("--shots", type=int, default=5, show_default=True,
              help="Solved dev examples per multiple-choice prompt.")
@click.option("--limit", type=int, help="At most N questions per subject (quick runs).")
@click.option("--data-dir", "data_dir", multiple=True, metavar="[BENCH=]PATH",
              help="Benchmark release folder (repeatable): BENCH=PATH, or a folder holding "
                   "ceval/ cmmlu/ mmlu/. [default: the sample questions quantkit ships]")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-length", type=int,
              help="Longest multiple-choice prompt in tokens; shots are dropped to fit. "
                   "[default: model context]")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=None,
              help="Unquantized models only. [default: as stored]")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model's own Python code (Baichuan2, ...).")
def command(model: Path, out: Path, base: Path | None, tasks: str | None, text: Path | None,
            text_format: str, seqlen: int | None, stride: int | None,
            max_tokens: int | None, shots: int,
            limit: int | None, data_dir: tuple[str, ...], batch_size: int,
            max_length: int | None, device: str, dtype: str | None,
            trust_remote_code: bool) -> None:
    """Perplexity, KL divergence from --base, and C-Eval/CMMLU/MMLU accuracy of MODEL.

    MODEL is any folder quantkit loads: BF16, quantkit's GPTQ or bitsandbytes output, or
    another tool's GPTQ folder. The JSON records the model, its quantization settings and
    size, every setting, library versions and timing, so `quantkit report` can combine it.
    """
    from quantkit.evaluate.runner import EvalConfig, run_eval

    if tasks is None:
        tasks = "ppl,kld,ceval,cmmlu,mmlu" if base else "ppl,ceval,cmmlu,mmlu"
    cfg = EvalConfig(model=model, out=out, tasks=tuple(tasks.split(",")), base=base, text=text,
                     text_format=text_format, seqlen=seqlen, stride=stride,
                     max_tokens=max_tokens, shots=shots,
                     limit=limit, data_dirs=data_dir, batch_size=batch_size,
                     max_length=max_length, device=device, dtype=dtype,
                     trust_remote_code=trust_remote_code)
    result = run_eval(cfg)
    for line in format_summary(result):
        click.echo(line)
    click.echo(f"wrote {out}")

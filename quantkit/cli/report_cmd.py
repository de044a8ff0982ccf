"""`quantkit report RESULT.json... --out report.md [--html] [--plot report.png]`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="RESULT.json...")
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="report.md",
              help="Markdown report (replaced atomically).")
@click.option("--html", is_flag=True, help="Also write the report as HTML beside --out.")
@click.option("--plot", type=click.Path(path_type=Path), metavar="report.png",
              help="Chart of memory against accuracy change (needs matplotlib: the plot extra).")
@click.option("--title", default="Quantization report", show_default=True)
def command(results: tuple[Path, ...], out: Path, html: bool, plot: Path | None,
            title: str) -> None:
    """Combine `quantkit eval` and `quantkit mem` results into one table per model set.

    Rows are models (the unquantized one is the base row and comes first); columns are
    memory, C-Eval, MMLU, CMMLU, perplexity and KL divergence, each quantized row showing
    its change against the base. `quantkit push` embeds the tables in the model card.
    """
    from quantkit.report import ReportConfig, markdown_table, write_report

    written = write_report(ReportConfig(results=results, out=out, html=html, plot=plot,
                                        title=title))
    click.echo(markdown_table(results))
    for path in written:
        click.echo(f"wrote {path}")

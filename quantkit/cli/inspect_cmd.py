"""`quantkit inspect PATH [--json]`."""

import json

import click

from quantkit.checkpoint import open_checkpoint
from quantkit.describe import describe, format_description


@click.command(name="inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(path: str, as_json: bool) -> None:
    """Describe a checkpoint: family, size, dtypes, quantization, remote code."""
    description = describe(open_checkpoint(path))
    if as_json:
        click.echo(json.dumps(description.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(format_description(description))

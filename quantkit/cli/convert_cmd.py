"""`quantkit convert baichuan2-to-1 SRC DST`."""

import click

from quantkit.convert import CONVERSION_NAME, convert


@click.command(name="convert")
@click.argument("kind", type=click.Choice([CONVERSION_NAME]))
@click.argument("source", type=click.Path(path_type=str))
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--bin", "bin_format", is_flag=True,
              help="Write pytorch_model.bin instead of safetensors (for older tools).")
@click.option("--force", is_flag=True,
              help="Replace an existing DEST; convert a source that is not Baichuan2.")
@click.option("--max-shard-size", default="5GB", show_default=True)
def command(kind: str, source: str, dest: str, bin_format: bool, force: bool,
            max_shard_size: str) -> None:
    """Convert a checkpoint.

    baichuan2-to-1: L2-normalize each row of Baichuan2's NormHead lm_head so tools built for
    Baichuan-1 (a plain Linear head) give the same logits. Every other tensor is copied
    bit-identical; the source is never modified.
    """
    result = convert(kind, source, dest, bin_format=bin_format, force=force,
                     max_shard_size=max_shard_size)
    click.echo(result.message)

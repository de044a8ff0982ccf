"""`quantkit bnb MODEL --out DIR (--nf4 | --fp4 | --int8)`."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.bnb import COMPUTE_DTYPES, BnbConfig, bnb_quantize
from quantkit.errors import ConfigError

_MODE_FLAGS = ("nf4", "fp4", "int8")


def pick_mode(**flags: bool) -> str:
    """Exactly one mode flag: which 4-bit code (or int8) is too consequential to default."""
    chosen = [name for name in _MODE_FLAGS if flags.get(name)]
    if len(chosen) != 1:
        given = " and ".join(f"--{name}" for name in chosen) or "none"
        raise ConfigError(f"bnb: pass exactly one of --nf4 (the Baichuan2/Aquila2 4-bit "
                          f"setting), --fp4 or --int8 (got {given})")
    return chosen[0]


def parse_skip_modules(value: str | None) -> tuple[str, ...] | None:
    """'lm_head, model.layers.0.mlp' -> ('lm_head', 'model.layers.0.mlp'); '' -> ()."""
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


@click.command(name="bnb")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="Output folder (written atomically).")
@click.option("--nf4", is_flag=True, help="4-bit NormalFloat (QLoRA; what Baichuan2 ships).")
@click.option("--fp4", is_flag=True, help="4-bit float (E2M1).")
@click.option("--int8", is_flag=True, help="LLM.int8 (8-bit rows, fp16 outlier columns).")
@click.option("--double-quant/--no-double-quant", default=None,
              help="4-bit only: also quantize the block scales.  [default: on]")
@click.option("--compute-dtype", type=click.Choice(list(COMPUTE_DTYPES)), default=None,
              help="4-bit only: dtype of the dequantized matmul.  [default: bf16]")
@click.option("--skip-modules", default=None, metavar="NAMES",
              help="Comma-separated modules kept in full precision, replacing the default "
                   "(the output head, e.g. lm_head). Full path or last part.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True)
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model's own Python code (Baichuan2, Aquila2, ...).")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--max-shard-size", default="5GB", show_default=True)
def command(model: str, out: str, nf4: bool, fp4: bool, int8: bool, double_quant: bool | None,
            compute_dtype: str | None, skip_modules: str | None, device: str,
            trust_remote_code: bool, force: bool, max_shard_size: str) -> None:
    """Quantize MODEL with bitsandbytes and save the serialized folder.

    The output loads with `AutoModelForCausalLM.from_pretrained(OUT)` (bitsandbytes
    installed) and with `quantkit.load`. The quantized model must give finite logits on
    calibration text, or nothing is written.
    """
    mode = pick_mode(nf4=nf4, fp4=fp4, int8=int8)
    if mode == "int8":
        for flag, value in (("--double-quant/--no-double-quant", double_quant),
                            ("--compute-dtype", compute_dtype)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --nf4 and --fp4 only; drop it for --int8")
    cfg = BnbConfig(
        source=Path(model), dest=Path(out), mode=mode,
        double_quant=True if double_quant is None else double_quant,
        compute_dtype=compute_dtype or "bf16", skip_modules=parse_skip_modules(skip_modules),
        device=device, trust_remote_code=trust_remote_code, force=force,
        max_shard_size=max_shard_size,
    )
    result = bnb_quantize(cfg)
    click.echo(f"wrote {result.dest} (bnb {mode}, {result.summary['size_ratio']:.2f}x the "
               "source weights)")

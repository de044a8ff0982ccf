"""The `quantkit` command line: a click group whose commands live one per module.

Each command module defines `command` (a click.Command) that parses flags into a config
and calls one library function. Modules are imported only when their command runs, so
`quantkit --help` stays fast and a command not delivered yet answers "not available yet".
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from quantkit import __version__
from quantkit.errors import NotAvailableError, QuantkitError

# name -> (module in this package, one-line description shown by `quantkit --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect_cmd", "Describe a checkpoint: family, size, dtypes, quantization."),
    "convert": ("convert_cmd", "Convert checkpoints (baichuan2-to-1 normalizes the NormHead)."),
    "gptq": ("gptq_cmd", "Quantize with GPTQ into safetensors every GPTQ loader reads."),
    "bnb": ("bnb_cmd", "Quantize with bitsandbytes (NF4/FP4/int8) into safetensors."),
    "eval": ("eval_cmd", "Perplexity, KL divergence and C-Eval/CMMLU/MMLU accuracy."),
    "mem": ("mem_cmd", "Memory after load and peak during a forward pass."),
    "report": ("report_cmd", "Combine eval and mem results into tables and a plot."),
    "push": ("push_cmd", "Upload an artifact with a model card to Hugging Face or ModelScope."),
    "run": ("run_cmd", "Run a YAML recipe: convert, quantize, eval, mem, report, push."),
    "export": ("export_cmd", "Export to ONNX (4-bit weights as MatMulNBits)."),
}


def _not_available(name: str, help_text: str) -> click.Command:
    @click.command(name=name, help=help_text,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def placeholder():
        raise NotAvailableError(f"`quantkit {name}` is not available yet in this version")

    return placeholder


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, help_text = COMMANDS[name]
        module_name = f"{__name__}.{module_name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _not_available(name, help_text)
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def cli(verbose: bool, quiet: bool) -> None:
    """quantkit: smaller LLM checkpoints, and proof of what the shrinking cost."""
    from quantkit.logging_setup import configure_logging

    configure_logging(verbose=verbose, quiet=quiet)


def error_line(message: str) -> str:
    """One `error:` line: library messages can span lines, and must not leak secrets."""
    from quantkit.secrets import redact

    return "error: " + "; ".join(part.strip() for part in redact(str(message)).splitlines()
                                 if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit code 2.

    SIGTERM is handled like Ctrl-C: the atomic writers remove their partial output.
    """
    from quantkit.interrupts import Terminated, signals_raise

    try:
        with signals_raise():
            cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
    except QuantkitError as exc:
        click.echo(error_line(str(exc)), err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Terminated:
        click.echo("error: terminated (SIGTERM); no partial output was left behind", err=True)
        return 2
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted; no partial output was left behind", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(error_line(exc.format_message()), err=True)
        return 2
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def console_main() -> None:
    sys.exit(main())

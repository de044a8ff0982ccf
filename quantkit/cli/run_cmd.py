"""`quantkit run RECIPE.yaml [--set key=value ...] [--out RUN_DIR] [--resume]`."""

from pathlib import Path

import click

from quantkit.recipe import load_recipe, run_recipe


@click.command(name="run")
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting: model=/path, or STEP.SETTING=VALUE (gptq.bits=3).")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: runs/<recipe name>).")
@click.option("--resume", is_flag=True, help="Skip steps whose outputs are complete and valid.")
@click.option("--force", is_flag=True, help="Reuse an existing run folder, redoing every step.")
@click.option("--check", is_flag=True, help="Validate the recipe and print the plan; run nothing.")
def command(recipe_path: Path, overrides: tuple[str, ...], run_dir: Path | None, resume: bool,
            force: bool, check: bool) -> None:
    """Run a recipe: the source model through convert, quantize, eval, mem, report, push.

    Every step is the command of the same name, with the recipe's settings as its flags;
    everything lands in one run folder with each step's JSON, the report and run.log.
    """
    recipe = load_recipe(recipe_path, list(overrides))
    run_dir = run_dir or Path("runs") / recipe.name
    if check:
        from quantkit.recipe import plan

        for inv in plan(recipe, run_dir):
            click.echo(f"{inv.label}: quantkit {inv.step.type} {' '.join(inv.args)}")
        return
    run_recipe(recipe, run_dir, resume=resume, force=force)
    report = run_dir / "report.md"
    if report.is_file():
        click.echo(report.read_text(encoding="utf-8"))
    click.echo(f"run folder: {run_dir}")

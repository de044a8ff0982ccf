"""`quantkit push DIR --to hf|modelscope --repo ORG/NAME`."""

from pathlib import Path

import click

from quantkit.card import format_size
from quantkit.hub import HUBS, PushConfig, push


@click.command(name="push")
@click.argument("artifact", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--to", type=click.Choice(HUBS), required=True, help="Which hub.")
@click.option("--repo", required=True, metavar="ORG/NAME", help="Repository to create or update.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", metavar="BRANCH",
              help="Branch to commit to (on Hugging Face created when missing). "
                   "Default: main / master.")
@click.option("--commit-message", metavar="M", help="Commit message.")
@click.option("--endpoint", metavar="URL",
              help="Hub URL (default: HF_ENDPOINT / MODELSCOPE_ENDPOINT, else the public hub).")
@click.option("--token", metavar="T",
              help="Write token; never logged. Prefer HF_TOKEN / MODELSCOPE_API_TOKEN: "
                   "command lines are visible to other users.")
@click.option("--dry-run", is_flag=True,
              help="Verify and list what would be uploaded; upload nothing.")
@click.option("--timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Give up reaching the hub after this long; also scales the upload deadline.")
@click.option("--report", type=click.Path(path_type=Path), metavar="report.md",
              help="Report whose tables go into the card (default: DIR/report.md if present).")
@click.option("--license", metavar="ID",
              help="License id for the card (default: the source card's, else 'other').")
@click.option("--base-model", metavar="ORG/NAME",
              help="Model this was made from, linked from the card (guessed from hub caches).")
def command(artifact: Path, to: str, repo: str, private: bool, revision: str | None,
            commit_message: str | None, endpoint: str | None, token: str | None,
            dry_run: bool, timeout: float, report: Path | None, license: str | None,
            base_model: str | None) -> None:
    """Verify an artifact against its quantkit.json and upload it with a model card.

    Option names double as `quantkit run` recipe keys (to, repo, license, ...). Keep the
    token out of recipes: the runner logs each step's arguments; use HF_TOKEN instead.

    Nothing in DIR is modified: the card (README.md) and, for ModelScope,
    configuration.json are generated into a temporary staging folder next to links to
    the verified files.
    """
    result = push(PushConfig(
        artifact=artifact, hub=to, repo=repo, private=private, revision=revision,
        commit_message=commit_message, endpoint=endpoint, token=token, dry_run=dry_run,
        timeout=timeout, report=report, license=license, base_model=base_model))
    plan = result.plan
    target = f"{to}:{repo} (branch {plan.revision}) at {plan.endpoint}"
    if result.dry_run:
        click.echo(f"would push {plan.artifact.path} to {target}")
        width = max(len(name) for name in plan.files)
        for name, size in plan.files.items():
            note = "  (generated)" if name in plan.generated else ""
            click.echo(f"  {name:<{width}}  {format_size(size):>10}{note}")
        click.echo(f"{len(plan.files)} files, {format_size(plan.total_bytes)}; nothing uploaded "
                   "(--dry-run)")
        return
    click.echo(f"pushed {len(plan.files)} files ({format_size(plan.total_bytes)}) to {target} "
               f"in {result.seconds:.1f}s: {result.url}")

"""YAML recipes: one reviewed file per published variant, one command that rebuilds it.

A recipe names the source model and a list of steps; each step's settings use the same
names as the CLI flags of the command it runs (`group_size` for `--group-size`), because a
step *is* that command: the runner turns the settings into arguments and invokes the same
click command a user would type. Recipes are validated against those commands before
anything runs, so a typo fails in a second, not after an hour of calibration.

Schema (see README "Recipes"):

    name: baichuan2-7b-chat-gptq-int4      # optional, names the run folder
    model: /models/Baichuan2-7B-Chat       # source checkpoint folder (relative to the recipe)
    trust_remote_code: true                # passed to every step that loads the model
    steps:
      - step: convert                      # convert | gptq | bnb | eval | mem | report | push
        kind: baichuan2-to-1
      - step: gptq
        name: gptq-int4                    # optional, unique; default: the step type
        input: convert                     # optional: a model-producing step or "source"
        ranks: 4                           # optional, gptq only: torchrun --nproc-per-node 4
        bits: 4
        group_size: 128
      - step: eval
        models: [base, gptq-int4]          # optional; default: the base and every artifact
        tasks: [ppl, kld]
      - step: report
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import yaml

from quantkit.checkpoint import (
    MANIFEST_NAME,
    check_no_overlap,
    read_json,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from quantkit.errors import CheckpointError, ConfigError, QuantkitError
from quantkit.interrupts import signals_raise
from quantkit.secrets import RedactFilter, redact, redact_obj

log = logging.getLogger(__name__)

MODEL_STEPS = ("convert", "gptq", "bnb")  # steps that write a checkpoint folder
RESULT_STEPS = ("eval", "mem")  # steps that write one JSON per model they measure
STEP_TYPES = (*MODEL_STEPS, *RESULT_STEPS, "report", "push")
TOP_LEVEL_KEYS = ("name", "model", "trust_remote_code", "steps", "description")
STEP_META_KEYS = ("step", "name", "input", "models", "ranks")
# Arguments the runner fills in itself; a recipe that sets them would fight the run folder.
RUNNER_OWNED = {"out", "force", "source", "dest", "path", "model", "results", "kind_arg"}
STATE_FILE = "run.json"
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RecipeError(ConfigError):
    """A recipe that cannot run: unknown key, unknown step, bad reference."""


@dataclass
class Step:
    type: str
    name: str
    settings: dict
    input: str | None = None  # model-producing step name, "source" or None (the base)
    models: list[str] | None = None  # for eval/mem: which models to measure
    ranks: int = 1  # gptq: processes sharing the calibration (torchrun on this machine)


@dataclass
class Recipe:
    path: Path
    model: Path
    steps: list[Step]
    name: str = "run"
    trust_remote_code: bool = False
    raw: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- loading


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: use key=value, e.g. --set gptq.bits=3")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set model=/x` sets a top-level key; `--set gptq.bits=3` sets a step's setting."""
    for item in overrides:
        keys, value = _parse_override(item)
        if len(keys) == 1:
            raw[keys[0]] = value
            continue
        step_name, setting = keys[0], ".".join(keys[1:])
        steps = [s for s in raw.get("steps") or [] if (s.get("name") or s.get("step")) ==
                 step_name]
        if not steps:
            names = [s.get("name") or s.get("step") for s in raw.get("steps") or []]
            raise RecipeError(
                f"--set {item}: no step named {step_name!r}{_closest(step_name, names)}")
        steps[0][setting] = value
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe; every problem is reported before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as "
                          "UTF-8") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with model: and steps:")
    raw = apply_overrides(raw, list(overrides))
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"{path}: unknown key {key!r}{_closest(key, TOP_LEVEL_KEYS)}")
    if "model" not in raw:
        raise RecipeError(f"{path}: needs model: (the source checkpoint folder)")
    if not raw.get("steps"):
        raise RecipeError(f"{path}: needs a non-empty steps: list")
    if not isinstance(raw["steps"], list):
        raise RecipeError(f"{path}: steps: must be a list of steps (- step: gptq ...), "
                          f"not {type(raw['steps']).__name__} {raw['steps']!r}")
    if not isinstance(raw["model"], str | os.PathLike) or not str(raw["model"]).strip():
        raise RecipeError(f"{path}: model: must be the path of the source checkpoint folder")
    model = Path(os.path.expanduser(str(raw["model"])))
    if not model.is_absolute():
        model = (path.parent / model).resolve()
    steps = [_parse_step(path, i, s) for i, s in enumerate(raw["steps"], start=1)]
    recipe = Recipe(path=path, model=model, steps=steps, name=str(raw.get("name") or path.stem),
                    trust_remote_code=bool(raw.get("trust_remote_code", False)), raw=raw)
    _check_references(recipe)
    for step in recipe.steps:
        _check_settings(path, step)
    return recipe


def _parse_step(path: Path, index: int, raw_step) -> Step:
    where = f"{path}: step {index}"
    if not isinstance(raw_step, dict) or "step" not in raw_step:
        raise RecipeError(f"{where}: each step is a mapping with step: <type>")
    kind = str(raw_step["step"])
    if kind not in STEP_TYPES:
        raise RecipeError(f"{where}: unknown step {kind!r}{_closest(kind, STEP_TYPES)} "
                          f"(steps: {', '.join(STEP_TYPES)})")
    name = str(raw_step.get("name") or kind)
    if not STEP_NAME.fullmatch(name) or name in (".", ".."):
        raise RecipeError(f"{where}: name {name!r}: use letters, digits, '.', '_' and '-' "
                          "only (it names a folder inside the run folder)")
    settings = {k: v for k, v in raw_step.items() if k not in STEP_META_KEYS}
    models = raw_step.get("models")
    if models is not None and kind not in RESULT_STEPS:
        raise RecipeError(f"{where}: models: applies to eval and mem steps only")
    if raw_step.get("input") is not None and kind in ("report",):
        raise RecipeError(f"{where}: report takes no input:; it reads every result of the run")
    ranks = raw_step.get("ranks", 1)
    if ranks != 1 and kind != "gptq":
        raise RecipeError(f"{where}: ranks: applies to gptq steps only")
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise RecipeError(f"{where}: ranks: {ranks!r} must be a positive whole number")
    return Step(type=kind, name=name, settings=settings,
                input=raw_step.get("input"),
                models=[str(m) for m in models] if models is not None else None, ranks=ranks)


def _check_references(recipe: Recipe) -> None:
    seen_models: list[str] = ["source", "base"]
    names: set[str] = set()
    for step in recipe.steps:
        where = f"{recipe.path}: step {step.name!r}"
        if step.name in names:
            raise RecipeError(f"{where}: two steps share this name; give one a name:")
        names.add(step.name)
        for ref in ([step.input] if step.input else []) + (step.models or []):
            if ref not in seen_models:
                raise RecipeError(f"{where}: refers to {ref!r}, which is not an earlier model "
                                  f"step{_closest(ref, seen_models)} (choices: "
                                  f"{', '.join(seen_models)})")
        if step.type in MODEL_STEPS:
            seen_models.append(step.name)


def _command(step_type: str) -> click.Command:
    from quantkit.cli import cli

    command = cli.get_command(click.Context(cli), step_type)
    if command is None:
        raise RecipeError(f"step {step_type!r} has no command")
    return command


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option)
            and p.name not in ("help",)}


def _check_settings(path: Path, step: Step) -> None:
    options = _options(_command(step.type))
    allowed = {n for n in options if n not in RUNNER_OWNED}
    positional = {p.name for p in _command(step.type).params if isinstance(p, click.Argument)}
    for key, value in step.settings.items():
        name = key.replace("-", "_")
        if step.type == "convert" and name == "kind":
            continue
        if name == "token":
            raise RecipeError(f"{path}: step {step.name!r}: a recipe must not hold a token "
                              "(it would land in run.log); set HF_TOKEN or MODELSCOPE_API_TOKEN")
        if name not in allowed:
            hint = (" (the runner sets it)" if name in RUNNER_OWNED | positional
                    else _closest(name, allowed))
            raise RecipeError(f"{path}: step {step.name!r}: unknown setting {key!r}{hint}")
        option = options[name]
        if isinstance(option.type, click.Choice) and not option.multiple:
            choices = [str(c) for c in option.type.choices]
            if not option.is_flag and str(value) not in choices:
                raise RecipeError(f"{path}: step {step.name!r}: {key}: {value!r} is not one of "
                                  f"{', '.join(choices)}")


# ----------------------------------------------------------------------------- running


def settings_to_args(command: click.Command, settings: dict, *, trust_remote_code: bool
                     ) -> list[str]:
    """Turn recipe settings into the command-line arguments of `command`."""
    options = _options(command)
    args: list[str] = []
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name == "kind":
            continue
        option = options[name]
        if option.is_flag and not option.secondary_opts:
            if value:
                args.append(option.opts[0])
        elif option.is_flag:
            args.append(option.opts[0] if value else option.secondary_opts[0])
        elif isinstance(value, list | tuple) and option.multiple:
            for item in value:
                args += [option.opts[0], str(item)]
        elif isinstance(value, list | tuple):
            args += [option.opts[0], ",".join(str(v) for v in value)]
        else:
            args += [option.opts[0], str(value)]
    if trust_remote_code and "trust_remote_code" in options and "trust_remote_code" not in \
            {k.replace("-", "_") for k in settings}:
        args.append("--trust-remote-code")
    return args


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_is_complete(folder: Path) -> bool:
    """A model folder counts as done when its manifest exists and every hash matches."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    files = read_json(manifest_path).get("files", {})
    return bool(files) and all((folder / name).is_file() and sha256_file(folder / name) == digest
                               for name, digest in files.items())


def _result_is_complete(path: Path) -> bool:
    try:
        return path.is_file() and isinstance(json.loads(path.read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


@dataclass
class Invocation:
    """One call of a command within a step, with the outputs that prove it finished."""

    step: Step
    args: list[str]
    outputs: list[Path]
    label: str


class RunState:
    """run.json: which invocations finished, with the fingerprint of their arguments."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.data = {"done": {}}
        if self.path.is_file():
            try:
                self.data = read_json(self.path)
            except CheckpointError as exc:
                raise RecipeError(f"{exc}; it records which steps finished: delete it and "
                                  "rerun with --force to run every step again") from exc
            if not isinstance(self.data.get("done"), dict):
                raise RecipeError(f"{self.path}: has no \"done\" record of finished steps; "
                                  "delete it and rerun with --force to run every step again")

    def is_done(self, inv: Invocation) -> bool:
        entry = self.data["done"].get(inv.label)
        return bool(entry) and entry["fingerprint"] == _fingerprint(inv.args) and all(
            artifact_is_complete(p) if p.suffix == "" else _result_is_complete(p)
            for p in inv.outputs)

    def mark_done(self, inv: Invocation) -> None:
        self.data["done"][inv.label] = {"fingerprint": _fingerprint(inv.args),
                                        "outputs": [str(p) for p in inv.outputs]}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def plan(recipe: Recipe, run_dir: Path) -> list[Invocation]:
    """Every command the recipe runs, in order, with its arguments and output paths."""
    models_dir, results_dir = run_dir / "models", run_dir / "results"
    model_paths: dict[str, Path] = {"source": recipe.model}
    base = "source"
    invocations: list[Invocation] = []
    results: list[Path] = []
    for step in recipe.steps:
        command = _command(step.type)
        extra = settings_to_args(command, step.settings,
                                 trust_remote_code=recipe.trust_remote_code)
        if step.type in MODEL_STEPS:
            src = model_paths[_resolve(step.input or base, base)]
            out = models_dir / step.name
            if step.type == "convert":
                args = [str(step.settings.get("kind", "baichuan2-to-1")), str(src), str(out),
                        "--force", *extra]
                base = step.name
            else:
                args = [str(src), "--out", str(out), "--force", *extra]
            model_paths[step.name] = out
            invocations.append(Invocation(step, args, [out], step.name))
        elif step.type in RESULT_STEPS:
            targets = step.models or [base, *[n for n in model_paths if n not in
                                               ("source", base) and n in _quantized(recipe)]]
            for target in targets:
                target = _resolve(target, base)
                out = results_dir / f"{step.name}-{target}.json"
                args = [str(model_paths[target]), "--out", str(out), *extra]
                if step.type == "eval" and "kld" in str(step.settings.get("tasks", "")) \
                        and "base" not in step.settings:
                    args += ["--base", str(model_paths[base])]
                invocations.append(Invocation(step, args, [out], f"{step.name}:{target}"))
                results.append(out)
        elif step.type == "report":
            out = run_dir / "report.md"
            args = [*map(str, results), "--out", str(out), *extra]
            has_mem = any(i.step.type == "mem" for i in invocations)
            if "plot" not in step.settings and has_mem and _can_plot():
                args += ["--plot", str(run_dir / "report.png")]
            invocations.append(Invocation(step, args, [out], step.name))
        else:  # push
            target = model_paths[_resolve(step.input or _last_artifact(model_paths, base), base)]
            if "report" not in step.settings and any(i.step.type == "report"
                                                     for i in invocations):
                extra += ["--report", str(run_dir / "report.md")]
            invocations.append(Invocation(step, [str(target), *extra], [], step.name))
    return invocations


def _can_plot() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _resolve(name: str, base: str) -> str:
    return base if name == "base" else name


def _quantized(recipe: Recipe) -> set[str]:
    return {s.name for s in recipe.steps if s.type in ("gptq", "bnb")}


def _last_artifact(model_paths: dict[str, Path], base: str) -> str:
    return list(model_paths)[-1] if len(model_paths) > 1 else base


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())  # run.log keeps every message, credentials as ***
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(old_level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def check_run_dir(recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
    """The run folder is new, or a previous run's (it holds run.json), and overlaps no input."""
    check_no_overlap(run_dir, [recipe.model], "--out", "source model")
    if not run_dir.exists():
        return
    if not (resume or force):
        raise ConfigError(f"{run_dir}: already exists; pass --resume to finish it or --force "
                          "to run every step again")
    if not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a folder; choose another --out")
    if any(run_dir.iterdir()) and not (run_dir / STATE_FILE).is_file():
        raise ConfigError(f"--out {run_dir}: holds files but no {STATE_FILE}, so it is not a "
                          "quantkit run folder; --resume and --force reuse only run folders, "
                          "choose another --out")


def _run_on_ranks(inv: Invocation) -> None:
    """`torchrun --standalone --nproc-per-node N -m quantkit STEP ARGS`, as a user would
    type it; the ranks print their own progress and their one error line."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(inv.step.ranks), "-m", "quantkit", inv.step.type, *inv.args]
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise QuantkitError(f"{inv.step.ranks} ranks exited with status {code}; the error "
                            "is printed above")


def run_recipe(recipe: Recipe, run_dir: str | os.PathLike, *, resume: bool = False,
               force: bool = False) -> list[Path]:
    """Run every step into `run_dir`; return the outputs. Stops at the first failing step."""
    run_dir = Path(run_dir)
    check_run_dir(recipe, run_dir, resume=resume, force=force)
    state = RunState(run_dir)  # a corrupt run.json fails before anything is written
    if force and not resume:
        state.data = {"done": {}}
    run_dir.mkdir(parents=True, exist_ok=True)
    state.save()
    (run_dir / "models").mkdir(exist_ok=True)
    (run_dir / "results").mkdir(exist_ok=True)
    copy = yaml.safe_dump(redact_obj(recipe.raw), allow_unicode=True, sort_keys=False)
    write_text_atomic(run_dir / "recipe.yaml", copy)
    outputs: list[Path] = []
    with _run_log(run_dir), signals_raise():
        log.info("recipe %s -> %s", recipe.path, run_dir)
        for inv in plan(recipe, run_dir):
            if resume and state.is_done(inv):
                log.info("step %s: outputs complete, skipped", inv.label)
                outputs += inv.outputs
                continue
            log.info("step %s: quantkit %s %s", inv.label, inv.step.type, " ".join(inv.args))
            try:
                if inv.step.ranks > 1:
                    _run_on_ranks(inv)
                else:
                    _command(inv.step.type).main(args=inv.args,
                                                 prog_name=f"quantkit {inv.step.type}",
                                                 standalone_mode=False)
            except QuantkitError as exc:
                raise QuantkitError(redact(
                    f"step {inv.label!r} failed: {exc} (earlier outputs are kept in {run_dir}; "
                    "fix it and rerun with --resume)")) from exc
            except click.ClickException as exc:
                raise QuantkitError(redact(f"step {inv.label!r} failed: "
                                           f"{exc.format_message()}")) from exc
            state.mark_done(inv)
            outputs += inv.outputs
        log.info("run complete: %s", run_dir)
    return outputs

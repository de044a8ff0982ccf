"""Recipes: validation before anything runs, the plan, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.recipe import RecipeError, load_recipe, plan, settings_to_args
from tests.helpers import assert_one_line_error, run_cli

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_setting_suggests_the_flag(tmp_path):
    path = _write(tmp_path, "model: m\nsteps:\n  - step: bnb\n    nf4: true\n"
                            "    compute_dtyp: bf16\n")
    with pytest.raises(RecipeError, match="unknown setting 'compute_dtyp'.*'compute_dtype'"):
        load_recipe(path)


def test_unknown_step_suggests_the_step(tmp_path):
    path = _write(tmp_path, "model: m\nsteps:\n  - step: bnbb\n")
    with pytest.raises(RecipeError, match="unknown step 'bnbb'.*'bnb'"):
        load_recipe(path)


def test_unknown_top_level_key(tmp_path):
    path = _write(tmp_path, "modle: m\nsteps:\n  - step: bnb\n")
    with pytest.raises(RecipeError, match="'modle'.*'model'"):
        load_recipe(path)


def test_bad_choice_and_bad_reference(tmp_path):
    path = _write(tmp_path, "model: m\nsteps:\n  - step: bnb\n    compute_dtype: fp8\n")
    with pytest.raises(RecipeError, match="fp8"):
        load_recipe(path)
    path = _write(tmp_path, "model: m\nsteps:\n  - step: bnb\n    input: nf5\n")
    with pytest.raises(RecipeError, match="'nf5'"):
        load_recipe(path)


def test_token_is_refused(tmp_path):
    path = _write(tmp_path, "model: m\nsteps:\n  - step: push\n    to: hf\n    repo: a/b\n"
                            "    token: hf_secret\n")
    with pytest.raises(RecipeError, match="HF_TOKEN"):
        load_recipe(path)


def test_runner_owned_setting_is_refused(tmp_path):
    path = _write(tmp_path, "model: m\nsteps:\n  - step: bnb\n    out: elsewhere\n")
    with pytest.raises(RecipeError, match="runner sets it"):
        load_recipe(path)


def test_settings_become_the_same_flags(tmp_path):
    from quantkit.cli.bnb_cmd import command

    args = settings_to_args(command, {"nf4": True, "double_quant": False,
                                      "compute_dtype": "fp16",
                                      "skip_modules": ["lm_head", "model.norm"]},
                            trust_remote_code=True)
    assert args == ["--nf4", "--no-double-quant", "--compute-dtype", "fp16",
                    "--skip-modules", "lm_head,model.norm", "--trust-remote-code"]


def test_overrides_and_plan(tmp_path):
    path = _write(tmp_path, "model: src\nsteps:\n  - step: convert\n    kind: baichuan2-to-1\n"
                            "  - step: bnb\n    name: nf4\n    nf4: true\n"
                            "  - step: bnb\n    name: int8\n    int8: true\n")
    recipe = load_recipe(path, ["nf4.compute_dtype=fp32", f"model={tmp_path / 'other'}"])
    assert recipe.model == tmp_path / "other"
    invocations = plan(recipe, tmp_path / "run")
    assert [i.label for i in invocations] == ["convert", "nf4", "int8"]
    converted = str(tmp_path / "run" / "models" / "convert")
    assert invocations[1].args[:3] == [converted, "--out", str(tmp_path / "run/models/nf4")]
    assert "--compute-dtype" in invocations[1].args and "fp32" in invocations[1].args
    assert invocations[2].args[0] == converted  # quantize the base, not the NF4 artifact


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, "model: m\nsteps:\n  - step: gptqq\n")
    assert_one_line_error(run_cli(capsys, "run", path), "unknown step 'gptqq'")


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(recipe, tmp_path):
    loaded = load_recipe(recipe)
    assert plan(loaded, tmp_path / "run")
    # Every shipped recipe is for a remote-code family (the demo model is Baichuan2-style).
    assert loaded.trust_remote_code, "remote-code families must say so explicitly"

from pathlib import Path

import pytest

from pkd.config import RECIPES_DIR, load_recipe, override, parse_assignments
from pkd.errors import ConfigError


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    load_recipe(path)


def test_default_is_the_demo_recipe() -> None:
    run = load_recipe().run
    assert (run.root, run.name) == ("cache/demo/full", "run")


def test_a_bad_answer_pattern_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[eval\] 'answer_pattern'.*not a regular expression"):
        override(load_recipe(), "eval", {"answer_pattern": "Answer: (\\d+"})


def test_unknown_key_names_file_table_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nnmae = "x"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: \[run\] unknown key 'nmae'"):
        load_recipe(bad)


def test_unknown_table(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[rnu]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown table \[rnu\]"):
        load_recipe(bad)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nseed = "three"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: \[run\] 'seed'.*integer.*'three'"):
        load_recipe(bad)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_flags_override_recipe_and_none_means_not_given() -> None:
    recipe = override(load_recipe(), "run", {"seed": 7, "name": None})
    assert recipe.run.seed == 7 and recipe.run.name == "run"
    with pytest.raises(ConfigError, match=r"command line: \[run\] 'seed'"):
        override(recipe, "run", {"seed": "x"})


def test_parse_assignments() -> None:
    assert parse_assignments(["run.seed=3", "run.name=abc"]) == {"run": {"seed": 3, "name": "abc"}}
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_assignments(["seed=3"])

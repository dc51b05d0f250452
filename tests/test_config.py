"""One source of truth: MLproject, the CLI, conda.yaml and pyproject agree with the code."""

import tomllib

import pytest
import yaml
from conftest import REPO

from entrypoints import train
from fmnist_pyfunc import cli, config, contract


def _cli_defaults() -> dict:
    parser = train.argparse.ArgumentParser()
    cli.add_training_arguments(parser)
    return cli.training_config(parser.parse_args([]))


def test_mlproject_train_parameters_match_train_defaults():
    """Every training parameter is in MLproject's train entry point with the same default, and vice versa."""
    params = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["train"]["parameters"]
    assert set(params) == set(config.TRAIN_DEFAULTS)
    for name, default in config.TRAIN_DEFAULTS.items():
        mlproject_default = params[name]["default"]
        if isinstance(default, bool):
            assert cli.parse_bool(str(mlproject_default)) is default, name
        else:
            assert type(default)(mlproject_default) == default, name


def test_mlproject_train_command_passes_every_parameter():
    """MLproject's train command forwards every TRAIN_DEFAULTS parameter to the CLI: none is silently dropped."""
    command = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["train"]["command"]
    for name in config.TRAIN_DEFAULTS:
        assert f"--{name.replace('_', '-')} {{{name}}}" in command, name


def test_cli_defaults_are_train_defaults():
    """The train CLI's argparse defaults are exactly TRAIN_DEFAULTS: one source of truth."""
    assert _cli_defaults() == config.TRAIN_DEFAULTS


def test_conda_env_pins_the_same_packages_as_pyproject():
    """conda.yaml (what `mlflow run` builds without --env-manager local) pins pyproject's serving and
    training packages, no more, no fewer."""
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(pip_deps) == sorted(project["dependencies"] + project["optional-dependencies"]["train"])


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"arch": "vgg"}, {"batch_size": 0}, {"lr": 0.0},
                                 {"depth": 9}, {"dropout": 1.0}, {"augment": "mixup"}, {"colour": 1},
                                 {"precision": "fp16"}])
def test_validate_rejects_bad_values_with_their_name(bad):
    """Each out-of-range or unknown training parameter is refused with a message naming it."""
    with pytest.raises(ValueError) as err:
        config.validate(bad)
    assert next(iter(bad)) in str(err.value)


def test_validate_fills_defaults():
    """A partial config is completed from TRAIN_DEFAULTS and keeps what was given."""
    assert config.validate({"epochs": 2}) == {**config.TRAIN_DEFAULTS, "epochs": 2}


def test_the_accepted_formats_are_named_once_and_the_docs_agree():
    """contract.FORMATS is the one list: the formats Pillow may open, the message, the UI's media types and
    the docs' list of the `image` input all follow it."""
    assert tuple(contract.FORMATS) == contract.ALLOWED_FORMATS
    names = [name for name, _ in contract.FORMATS.values()]
    assert f"{', '.join(names[:-1])} or {names[-1]}" == contract.ACCEPTED
    assert contract.MEDIA_TYPES.split(",") == [media for _, media in contract.FORMATS.values()]
    image_line = next(line for line in (REPO / "docs/serving.md").read_text().splitlines()
                      if line.startswith("* `image`:"))
    assert all(name in image_line for name in names), image_line

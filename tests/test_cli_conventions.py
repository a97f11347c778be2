"""One command-line convention (issue 15.4): every ``hpc_gan`` command's parsing lives in a
``cli_*.py`` beside its library module; ``python -m hpc_gan.train`` reports usage errors in one
line like the rest; one helper joins the process group."""

from __future__ import annotations

import importlib
import inspect

import pytest

from hpc_gan.cli import COMMANDS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_lives_in_a_cli_module(name):
    module = COMMANDS[name][0]
    assert module.rsplit(".", 1)[1].startswith("cli_"), module
    loaded = importlib.import_module(module)
    assert callable(loaded.add_arguments) and callable(loaded.run)


def test_library_modules_parse_no_arguments():
    for library in ("hpc_gan.train.plan", "hpc_gan.launch.submit", "hpc_gan.launch.status", "hpc_gan.launch.pull",
                    "hpc_gan.eval.compare", "hpc_gan.eval.tstr"):
        source = inspect.getsource(importlib.import_module(library))
        assert "add_argument" not in source and "ArgumentParser(" not in source, library


def test_train_usage_error_is_one_line(capsys):
    from hpc_gan.train.__main__ import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--no-such-option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m hpc_gan.train" in err and "--no-such-option" in err
    with pytest.raises(SystemExit) as exc:
        parse_args([])  # neither --variant nor --config
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--variant" in err and "usage:" not in err


def test_one_process_joins_no_group():
    import torch.distributed

    from hpc_gan.dist import join_process_group

    env = join_process_group({})
    assert (env.rank, env.world_size) == (0, 1) and not torch.distributed.is_initialized()


def test_tstr_config_defaults_are_the_command_line_defaults():
    """The submitted tstr job builds a TstrConfig from its defaults; they must be what
    ``hpc_gan tstr`` would use (the job used to copy them into a hand-made Namespace)."""
    import argparse
    import dataclasses

    from hpc_gan.cli_types import data_cache_settings
    from hpc_gan.eval import cli_tstr
    from hpc_gan.eval.tstr import TstrConfig

    parser = argparse.ArgumentParser()
    cli_tstr.add_arguments(parser)
    args = parser.parse_args(["--real", "r", "--images", "i", "--labels", "l", "--source", "real", "--out", "o"])
    settings = TstrConfig("r", "i", "l", ["real"], "o")
    for item in dataclasses.fields(settings):
        if item.name != "data_cache":
            assert getattr(args, item.name) == getattr(settings, item.name), item.name
    assert data_cache_settings(args) == settings.data_cache

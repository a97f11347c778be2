"""Run configuration: composition order, typed overrides, clear errors, round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpc_gan import config
from hpc_gan.errors import ConfigError

pytestmark = pytest.mark.unit


def test_every_variant_and_profile_loads():
    for variant in config.available("variants"):
        for profile in [None] + config.available("profiles"):
            cfg = config.load_config(variant, profile)
            assert cfg.variant == variant
    assert {"gp", "sn", "sn_mp", "c_sn_mp", "xl_sn_mp", "hr_sn_mp", "dp"} <= set(config.available("variants"))


def test_variants_match_the_paper_table():
    assert config.load_config("gp").model.critic_norm == "instance"
    assert config.load_config("gp").train.precision == "fp32"
    sn = config.load_config("sn")
    assert (sn.model.critic_norm, sn.model.ngf, sn.train.precision) == ("spectral", 512, "fp32")
    assert config.load_config("sn_mp").train.precision == "auto"
    c = config.load_config("c_sn_mp")
    assert (c.model.ngf, c.model.ndf) == (1024, 1024)
    dp = config.load_config("dp")
    assert dp.privacy.enabled and dp.train.gp_weight == 0 and dp.train.n_critic == 5 and dp.model.ngf == 256
    base = config.load_config("gp").train
    assert (base.lr_critic, base.lr_generator, base.betas, base.gp_weight, base.n_critic) == (4e-4, 2e-4, (0.0, 0.9), 10.0, 1)


def test_layers_apply_in_order_base_variant_profile_cluster_set():
    cfg = config.load_config("c_sn_mp", "smoke", "local", ["model.ngf=64", "train.lr_critic=1e-4"])
    assert cfg.model.ndf == 32            # profile over variant
    assert cfg.model.ngf == 64            # --set over profile
    assert cfg.model.critic_norm == "spectral"  # from the variant, untouched by the profile
    assert cfg.cluster.tasks_per_node == 2 and cfg.cluster.cpus_per_task == 1  # cluster over profile
    assert cfg.train.lr_critic == 1e-4    # "1e-4" is a string in YAML 1.1, typed as float here
    assert cfg.profile == "smoke"


def test_tuple_override_forms():
    for text in ("64,64,32", "[64, 64, 32]", "64x64x32"):
        assert config.load_config("sn", overrides=[f"model.patch_shape={text}"]).model.patch_shape == (64, 64, 32)


@pytest.mark.parametrize("override, words", [
    ("train.lr_critc=1", ["unknown config key 'train.lr_critc'", "did you mean 'train.lr_critic'", "batch_size"]),
    ("trian.batch_size=1", ["unknown config key 'trian'", "did you mean 'train'"]),
    ("train.batch_size=two", ["train.batch_size", "expected int"]),
    ("train.batch_size=0", ["train.batch_size=0", ">= 1"]),
    ("train.zero_stage_critic=3", ["train.zero_stage_critic=3", "<= 2"]),
    ("train.precision=fp8", ["train.precision", "auto, fp16, bf16, fp32"]),
    ("train.offload_optimizer=maybe", ["train.offload_optimizer", "expected bool"]),
    ("model.patch_shape=64,64", ["model.patch_shape", "expected 3 values"]),
    ("model.patch_shape=40,64,32", ["model.patch_shape", "not divisible by 16"]),
    ("train.betas=0.5,1.5", ["train.betas=0.5,1.5", "each value must be < 1.0"]),
    ("train.betas=1.0,0.9", ["train.betas=1.0,0.9", "each value must be < 1.0"]),  # torch's Adam refuses 1.0
    ("train.betas=0.0,1.0", ["train.betas=0.0,1.0", "each value must be < 1.0"]),
    ("train.betas=-0.1,0.9", ["train.betas=-0.1,0.9", ">= 0.0"]),
    ("train", ["not of the form section.key=value"]),
    ("train.lr_critic=nan", ["train.lr_critic", "not a finite number"]),
    ("train.gp_weight=.inf", ["train.gp_weight", "not a finite number"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as info:
        config.load_config("sn", overrides=[override])
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_variant_and_profile_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown variant 'snmp' \(did you mean 'sn_mp'\?\); valid variants: c_sn_mp"):
        config.load_config("snmp")
    with pytest.raises(ConfigError, match="valid profiles: .*smoke"):
        config.load_config("sn", profile="nope")


def test_dp_with_gradient_penalty_is_refused():
    with pytest.raises(ConfigError, match="gp_weight=0"):
        config.load_config("dp", overrides=["train.gp_weight=10"])


def test_unknown_key_in_a_yaml_file(tmp_path, monkeypatch):
    for sub in ("variants", "profiles", "clusters"):
        (tmp_path / sub).mkdir()
    (tmp_path / "base.yaml").write_text("train: {batch_size: 4}\n")
    (tmp_path / "variants" / "v.yaml").write_text("model: {ngf: 64, ndf: 64, crtic_norm: spectral}\n")
    monkeypatch.setenv(config.CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="did you mean 'model.critic_norm'"):
        config.load_config("v")
    (tmp_path / "variants" / "v.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_config("v")


def test_save_and_reload_round_trip(tmp_path):
    cfg = config.load_config("c_sn_mp", "smoke", overrides=["train.seed=7"])
    config.save_config(cfg, tmp_path / "run" / "config.yaml")
    assert config.load_resolved(tmp_path / "run" / "config.yaml") == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_every_field_is_documented():
    rows = config.describe()
    assert len(rows) > 40
    for key, _kind, _default, doc in rows:
        assert doc, f"{key} has no documentation"


def test_run_dir():
    cfg = config.load_config("gp", overrides=["name=exp1", "output_root=/scratch/runs"])
    assert str(cfg.run_dir) == "/scratch/runs/exp1/gp"


def test_every_accepted_beta_is_accepted_by_torch():
    """The config's range is torch.optim.Adam's: what passes validation never fails later."""
    import torch

    for betas in ("0.0,0.0", "0.5,0.999999", "0.9999,0.9"):
        cfg = config.load_config("sn", overrides=[f"train.betas={betas}"])
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], betas=cfg.train.betas)


def test_configs_ship_inside_the_package_and_a_user_directory_replaces_them(tmp_path, monkeypatch):
    monkeypatch.delenv(config.CONFIG_DIR_ENV, raising=False)
    assert config.config_dir() == config.PACKAGE_CONFIG_DIR
    assert config.PACKAGE_CONFIG_DIR.parent == Path(config.__file__).resolve().parent  # hpc_gan/configs
    assert {"gp", "sn", "sn_mp", "c_sn_mp", "dp"} <= set(config.available("variants"))
    own = tmp_path / "own"
    (own / "variants").mkdir(parents=True)
    (own / "base.yaml").write_text("train: {batch_size: 3}\n")
    (own / "variants" / "mine.yaml").write_text("model: {ngf: 64, ndf: 64}\n")
    monkeypatch.setenv(config.CONFIG_DIR_ENV, str(own))
    assert config.available("variants") == ["mine"]
    cfg = config.load_config("mine")
    assert (cfg.train.batch_size, cfg.model.ngf) == (3, 64)


def test_a_config_directory_without_base_yaml_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(config.CONFIG_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"config directory '.*nowhere' \(from HPC_GAN_CONFIG_DIR\) has no "
                                          r"base.yaml; point HPC_GAN_CONFIG_DIR at a copy of") as info:
        config.load_config("sn")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["variants", "profiles"])
def test_every_variant_and_profile_states_hardware_command_and_expected_result(kind, monkeypatch):
    """nanoGPT's habit: the header says what the file was sized for, how to run it, what to expect."""
    monkeypatch.delenv(config.CONFIG_DIR_ENV, raising=False)
    files = sorted((config.PACKAGE_CONFIG_DIR / kind).glob("*.yaml"))
    assert files
    flag = "--variant" if kind == "variants" else "--profile"
    for path in files:
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        text = "\n".join(header)
        for field in ("# Sized for: ", "# Command:   ", "# Expected"):
            assert any(line.startswith(field) for line in header), f"{path.name}: no '{field.strip()}' line"
        command = next(line for line in header if line.startswith("# Command:"))
        assert f"{flag} {path.stem}" in command, f"{path.name}: the command does not use {flag} {path.stem}"
        expected = text[text.index("# Expected"):]
        assert (re.search(r"recorded[^\n]*\d{4}-\d{2}-\d{2}", expected)
                or "not measured yet: needs a GPU" in expected), f"{path.name}: no recorded figure or 'not measured yet'"

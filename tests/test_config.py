import pytest

from aepo_core.config import Config, ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  name: grpo\n  target_entropy: 0.3\nrollout:\n  n: 4\n")
    cfg = load_config(path, ["rollout.n=6", "trainer.lr=3e-5", "evaluation.greedy=true", "model.path=null"])
    assert cfg.algorithm.name == "grpo"
    assert cfg.algorithm.target_entropy == 0.3
    assert cfg.rollout.n == 6  # the override wins over the file
    assert cfg.trainer.lr == 3e-5 and cfg.evaluation.greedy is True and cfg.model.path is None
    assert cfg.algorithm.t_high == 1.2  # untouched defaults stay


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algorithm:\n  target_entropi: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "algorithm.target_entropi" in str(err.value) and str(path) in str(err.value)


def test_ill_typed_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  n: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "rollout.n" in str(err.value) and "bad.yaml" in str(err.value) and "'many'" in str(err.value)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match=r"(?s)override 'trainer\.lr=-1'.*trainer\.lr"):
        load_config(None, ["trainer.lr=-1"])
    with pytest.raises(ConfigError, match="unknown key 'rollout.temprature'"):
        load_config(None, ["rollout.temprature=1.0"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["rollout.n"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="t_low"):
        load_config(None, ["algorithm.t_low=1.5", "algorithm.t_high=1.2"])
    with pytest.raises(ConfigError, match="loss_constant"):
        load_config(None, ["algorithm.loss_agg=constant"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_a_binary_config_file_is_one_clear_error(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(bytes(range(256)) * 4)  # e.g. a checkpoint passed as --config
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path} is not a text file (a YAML config is expected)"


@pytest.mark.parametrize("algorithm", ["grpo", "aepo", "entropy_reg", "entropy_adv", "adaptive_entropy"])
def test_a_group_of_one_response_is_refused(algorithm):
    """rollout.n=1 trains nothing (every advantage is 0): refused, naming the key and the fix."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"algorithm.name={algorithm}", "rollout.n=1"])
    message = str(err.value)
    assert "key 'rollout.n'" in message and "no advantage" in message and "2 or more" in message
    assert "Value error" not in message
    assert load_config(None, [f"algorithm.name={algorithm}", "rollout.n=2"]).rollout.n == 2


def test_yaml_round_trip_and_flat(tmp_path):
    cfg = load_config(None, ["algorithm.target_entropy=0.75"])
    path = tmp_path / "again.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    flat = Config().flat()
    assert flat["algorithm.target_entropy"] == 0.15 and flat["rollout.n"] == 8


def test_shipped_configs_are_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).parents[1] / "data" / "configs").glob("*.yaml"))
    assert shipped, "data/configs holds the documented example configs"
    for path in shipped:
        load_config(path)


def test_kl_cov_on_policy_warns():
    """KL-Cov with one optimiser step per rollout is plain GRPO: the config says so; with two
    mini-batches it does not."""
    import warnings

    with pytest.warns(UserWarning, match="kl_cov with trainer.mini_batches=1"):
        load_config(None, ["algorithm.name=kl_cov"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["algorithm.name=kl_cov", "trainer.mini_batches=2"])
        load_config(None, ["algorithm.name=grpo"])

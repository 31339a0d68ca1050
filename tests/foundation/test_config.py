"""The one config: YAML text, files, dicts and kwargs all validate to the same Config."""
import pytest

from nbtune.train.config import Config, ConfigError, build_config


def test_yaml_text_dict_and_kwargs_agree(tmp_path):
    text = "model: smollm2-135m-instruct\ndata: {source: gsm8k}\ntrain: {max_steps: 7, lr: 2e-4}\n"
    path = tmp_path / "run.yaml"
    path.write_text(text)
    a = build_config(text)
    b = build_config(str(path))
    c = build_config({"model": {"name": "smollm2-135m-instruct"}, "train": {"max_steps": 7, "lr": 0.0002}})
    d = build_config(model="smollm2-135m-instruct", train={"max_steps": 7, "lr": "2e-4"})
    assert a == b == c == d
    assert isinstance(a.train.lr, float) and a.train.lr == 2e-4  # YAML reads 2e-4 as text; still a float
    assert build_config(a.to_yaml()) == a


def test_defaults_are_the_t4_recipe():
    cfg = Config()
    assert cfg.model.name == "smollm2-135m-instruct"
    # "auto": offloaded on one GPU (the T4 recipe), plain under data parallelism where it fits
    assert cfg.train.optimizer == "adamw_8bit" and cfg.train.gradient_checkpointing == "auto"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    for mode in ("auto", "offload", "plain", "off"):
        assert build_config(train={"gradient_checkpointing": mode}).train.gradient_checkpointing == mode


@pytest.mark.parametrize("cfg, needle", [
    ({"trian": {}}, "did you mean 'train'"),
    ({"train": {"max_step": 3}}, "did you mean 'train.max_steps'"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"train": {"optimizer": "adam9"}}, "adamw_8bit"),
    ({"model": {"dtype": "fp8"}}, "model.dtype"),
])
def test_bad_values_name_the_field(cfg, needle):
    with pytest.raises(ConfigError) as err:
        build_config(cfg)
    assert needle in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config("train: {max_steps: [\n")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        build_config("- just\n- a list\n")


def test_yaml_is_never_evaluated():
    with pytest.raises(ConfigError):
        build_config("model: !!python/object/apply:os.system ['echo hacked']\n")

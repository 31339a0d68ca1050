"""Config text that YAML accepts but that would lose or bend a setting: a key given twice, words that
YAML 1.1 reads as booleans, an alias bomb, a file in another encoding or with another extension.
Each is refused with one line naming the key, or read as the user meant; nothing is loaded or written."""
import pytest

from nbtune.train import ConfigError, build_config
from nbtune.train.trainer import sft_args
from nbtune.ui.cli import main as cli_main

from .conftest import one_line


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: 3\n  lr: 5e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'lr' twice in one section \(lines 2 and 4\)"):
        build_config(str(path))


def test_a_section_given_twice_is_refused():
    with pytest.raises(ConfigError, match="'train' twice"):
        build_config("train: {lr: 1e-4}\nmodel: {max_seq_length: 64}\ntrain: {max_steps: 3}\n")


def test_the_same_key_in_two_sections_is_fine():
    cfg = build_config("data: {max_rows: 5}\ntrain: {max_steps: 7}\nmodel: {max_seq_length: 64}\n")
    assert (cfg.data.max_rows, cfg.train.max_steps) == (5, 7)


@pytest.mark.parametrize("word, mode", [("off", "off"), ("no", "off"), ("false", "off"), ("plain", "plain"),
                                        ("offload", "offload")])
def test_checkpointing_words_that_yaml_reads_as_booleans(word, mode):
    assert build_config(f"train: {{gradient_checkpointing: {word}}}\n").train.gradient_checkpointing == mode


def test_checkpointing_on_asks_for_a_mode():
    with pytest.raises(ConfigError, match=r"train.gradient_checkpointing: true .* write 'auto', 'offload'"):
        build_config("train: {gradient_checkpointing: on}\n")


def test_an_alias_bomb_is_refused_in_a_short_message():
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefgh"):
        prev = "a" if i == 0 else "bcdefgh"[i - 1]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(levels) + "\ntrain: {max_steps: *h}\n"
    with pytest.raises(ConfigError) as err:
        build_config(text)
    assert "more than 10,000 values" in str(err.value) and len(str(err.value)) < 400


def test_a_long_bad_value_is_cut_in_the_message():
    with pytest.raises(ConfigError) as err:
        build_config(train={"lr": "x" * 100_000})
    assert "train.lr" in str(err.value) and "100,002 characters" in str(err.value) and len(str(err.value)) < 600


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("train: {max_steps: 3}\n# réglage\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text.*save it as UTF-8"):
        build_config(str(path))


def test_a_config_file_with_another_extension_is_read(tmp_path):
    path = tmp_path / "run.cfg"
    path.write_text("train: {max_steps: 3}\n", encoding="utf-8")
    assert build_config(str(path)).train.max_steps == 3
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "other.cfg"))


def test_cli_reads_a_cfg_file_and_refuses_a_duplicate(tmp_path, capsys):
    path = tmp_path / "run.cfg"
    path.write_text("train:\n  max_steps: 3\n  max_steps: 4\n", encoding="utf-8")
    assert cli_main(["finetune", str(path)]) == 2
    assert "'max_steps' twice" in one_line(capsys.readouterr().err)


def test_demo_steps_zero_is_refused_not_ignored(capsys):
    assert cli_main(["demo", "--steps", "0", "--out", "unused-demo-dir"]) == 2
    assert "train.max_steps" in one_line(capsys.readouterr().err)


class _Param:
    def __init__(self):
        import torch

        self.p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.p])


@pytest.mark.parametrize("max_steps, warmup", [(3, 1), (60, 2), (1000, 30)])
def test_warmup_is_a_fraction_of_the_run_by_default(tmp_path, max_steps, warmup):
    cfg = build_config(train={"max_steps": max_steps})
    args = sft_args(cfg, tmp_path, _Param(), has_eval=False)
    assert args.get_warmup_steps(max_steps) == warmup


def test_warmup_in_steps_is_kept(tmp_path):
    cfg = build_config(train={"max_steps": 10, "warmup_steps": 4})
    assert sft_args(cfg, tmp_path, _Param(), has_eval=False).get_warmup_steps(10) == 4

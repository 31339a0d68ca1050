"""One schema for the three doors: numbers as people write them, errors that name the field and
what is allowed there, T4 defaults."""
import pytest

from nbtune.train.config import Config, ConfigError, build_config, config_reference
from nbtune.ui.overrides import dotted_override


@pytest.mark.parametrize("text", ["lr: 2e-4", "lr: 2.0e-4", "lr: 2E-4", "lr: '2e-4'", "lr: 0.0002", "lr: 2e-04",
                                  "lr: +2e-4"])
def test_lr_is_a_float_however_it_is_written(text):
    cfg = build_config(f"train: {{{text}}}\n")
    assert type(cfg.train.lr) is float and cfg.train.lr == pytest.approx(2e-4, rel=0, abs=0)


def test_numbers_from_every_door_agree():
    yaml_cfg = build_config("train:\n  lr: 2e-4\n  max_steps: 1e2\n")
    kw_cfg = build_config(train={"lr": "2e-4", "max_steps": 100})
    set_cfg = build_config(None, **dotted_override("train.lr=2e-4"))
    assert yaml_cfg.train.lr == kw_cfg.train.lr == set_cfg.train.lr == 2e-4
    assert yaml_cfg.train.max_steps == 100 and isinstance(yaml_cfg.train.max_steps, int)


@pytest.mark.parametrize("cfg, needles", [
    ({"train": {"scheduler": "cos"}}, ["train.scheduler", "'linear'", "'cosine'", "'constant_with_warmup'"]),
    ({"train": {"optimizer": "adam9"}}, ["train.optimizer", "'adamw_8bit'", "'sgd'"]),
    ({"model": {"dtype": "fp8"}}, ["model.dtype", "'float16'", "'bfloat16'"]),
    ({"train": {"gradient_checkpointing": "sometimes"}},
     ["train.gradient_checkpointing", "'auto'", "'offload'", "'plain'", "'off'", "'sometimes'"]),
    ({"train": {"gradient_checkpointing": True}}, ["train.gradient_checkpointing", "'auto'"]),
    ({"data": {"format": "chat"}}, ["data.format", "'messages'", "'prompt_completion'", "'text'"]),
    ({"output": {"export": ["onnx"]}}, ["output.export", "'adapter'", "'merged'", "'gguf'"]),
    ({"output": {"gguf_quant": "q4_0"}}, ["output.gguf_quant", "'q8_0'", "'q4_k_m'"]),
    ({"lora": {"targets": 5}}, ["lora.targets", "str | list[str]"]),
    ({"train": {"batch_size": 0}}, ["train.batch_size", "> 0"]),
    ({"lora": {"dropout": 1.5}}, ["lora.dropout", "< 1.0"]),
    ({"model": {"load_in_4bit": "maybe"}}, ["model.load_in_4bit", "bool | null"]),
    ({"data": {"eval_split": 3}}, ["data.eval_split", "0 < x < 1"]),
    ({"train": {"max_steps": None}}, ["train.max_steps", "train.epochs"]),
    ({"data": {"sorce": "x.jsonl"}}, ["did you mean 'data.source'", "allowed here: source, split"]),
    ({"outptu": {}}, ["did you mean 'output'", "model, data, lora, train, output"]),
])
def test_errors_name_the_field_and_the_allowed_values(cfg, needles):
    with pytest.raises(ConfigError) as err:
        build_config(cfg)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_sections_and_reference_cover_the_issue():
    ref = config_reference()
    for key in ("name:", "max_seq_length:", "load_in_4bit:", "dtype:", "source:", "format:", "columns:",
                "chat_template:", "responses_only:", "packing:", "eval_split:", "r:", "alpha:", "dropout:",
                "targets:", "max_steps:", "epochs:", "batch_size:", "grad_accum:", "lr:", "scheduler:",
                "warmup_steps:", "optimizer:", "weight_decay:", "seed:", "logging_steps:", "eval_steps:",
                "save_steps:", "force:", "dir:", "export:", "gradient_checkpointing:"):
        assert f"  {key}" in ref, key
    assert "gradient_checkpointing: 'auto' | 'offload' | 'plain' | 'off' = 'auto'" in ref
    assert Config.reference() == ref


def test_export_and_the_first_schemas_save_merged():
    assert Config().output.export == ["adapter"]
    assert build_config(output={"save_merged": True}).output.export == ["adapter", "merged"]
    assert build_config(output={"export": "merged"}).output.save_merged
    assert build_config(data={"eval_split": "0.1"}).data.eval_split == 0.1
    assert build_config(data={"eval_split": "validation"}).data.eval_split == "validation"


def test_defaults_fit_an_8b_model_on_a_t4():
    from nbtune.planner import plan_from_config

    plan = plan_from_config(build_config(model="meta-llama/Llama-3.1-8B-Instruct"), gpu="T4")
    assert plan.fits, plan
    assert Config().train.optimizer == "adamw_8bit"


SET_ITEMS = ["train.lr=2e-4", "train.max_steps=1e2", "lora.targets=[q_proj, v_proj]", "model.load_in_4bit=false",
             "output.dir=out dir/run 1", "data.max_rows=64", "lora.alpha=32"]


def test_both_doors_give_the_same_config_for_the_same_set_items(ip, tmp_path):
    """``nbtune finetune run.yaml --set ...`` and ``%finetune run.yaml --set ...`` read each value alike."""
    import shlex

    from IPython.core.magic_arguments import parse_argstring

    from nbtune.ui import cli
    from nbtune.ui.magic import FinetuneMagics

    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2-135m-instruct\ntrain: {epochs: 2}\nlora: {r: 8}\n")
    magics = FinetuneMagics(shell=ip)
    line = shlex.quote(str(path)) + "".join(f" --set {shlex.quote(item)}" for item in SET_ITEMS)
    from_magic = magics._config(parse_argstring(magics.finetune, line), None)
    argv = ["finetune", str(path)] + [part for item in SET_ITEMS for part in ("--set", item)]
    from_cli = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert from_magic == from_cli
    cfg = from_cli
    assert type(cfg.train.lr) is float and cfg.train.lr == 2e-4
    assert cfg.train.max_steps == 100 and cfg.train.epochs is None  # max_steps replaces the file's epochs
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.r == 8 and cfg.lora.alpha == 32
    assert cfg.model.load_in_4bit is False and cfg.output.dir == "out dir/run 1" and cfg.data.max_rows == 64


@pytest.mark.parametrize("item", ["lr=1e-4", "train.=1", ".lr=1", "train.lr"])
def test_a_set_item_without_section_key_and_value_is_a_config_error(item):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        dotted_override(item)

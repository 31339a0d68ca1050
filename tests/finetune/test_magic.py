"""``%%finetune`` through a real IPython InteractiveShell with ``%load_ext nbtune``: help, --plan,
--dry-run, {var} expansion, config errors, the planner's stop, and one real run of the embedded
SmolLM2-135M-Instruct on the CPU with the live dashboard."""
import subprocess
import sys

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from .conftest import run_cell

pytestmark = pytest.mark.filterwarnings("ignore")


def test_load_ext_registers_the_magic_without_importing_torch():
    code = ("import sys\nfrom IPython.core.interactiveshell import InteractiveShell\n"
            "ip = InteractiveShell.instance()\nip.run_cell('%load_ext nbtune').raise_error()\n"
            "assert 'finetune' in ip.magics_manager.magics['cell']\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_help_shows_flags_example_and_every_config_key(ip):
    with capture_output() as cap:
        ip.run_cell("%%finetune?")
    text = cap.stdout
    for needle in ("--plan", "--dry-run", "--resume", "--out VAR", "%%finetune --out run1", "max_seq_length:",
                   "responses_only:", "grad_accum:", "optimizer: 'adamw_8bit' | 'adamw'", "export:"):
        assert needle in text, needle


def test_plan_shows_the_plan_only_with_variables_expanded(ip):
    ip.user_ns.update(gpu="T4", model_id="meta-llama/Llama-3.1-8B-Instruct")
    plan = run_cell(ip, "%%finetune --plan --gpu {gpu} --set model.name={model_id} --out the_plan\ntrain: {batch_size: 2}\n")
    assert ip.user_ns["the_plan"] is plan
    assert plan.fits and plan.gpu.name == "T4" and plan.model.name == "llama-3.1-8b"
    assert plan.settings.batch_size == 2 and plan.settings.seq_len == 2048
    assert "FITS" in plan._repr_html_()


def test_config_errors_are_usage_errors_naming_field_and_allowed_values(ip):
    with pytest.raises(UsageError) as err:
        run_cell(ip, "%%finetune --plan\ntrain: {scheduler: cosine_annealing}\n")
    assert "train.scheduler" in str(err.value) and "'constant_with_warmup'" in str(err.value)
    with pytest.raises(UsageError) as err:
        run_cell(ip, "%%finetune --plan\nlora: {rank: 8}\n")
    assert "did you mean 'lora.r'" in str(err.value)
    with pytest.raises(UsageError, match="section.key=value"):
        run_cell(ip, "%%finetune --plan --set lr=1e-4\nmodel: smollm2-135m-instruct\n")


def test_a_run_predicted_not_to_fit_stops_before_loading_with_advice(ip, monkeypatch, tmp_path):
    from nbtune.train import session
    from nbtune.train.run import check_fits

    monkeypatch.setenv("NBTUNE_GPU", "T4")  # check as if on a T4
    before = session.cached_model_key()
    with pytest.raises(UsageError) as err:
        run_cell(ip, f"%%finetune\nmodel: {{name: meta-llama/Llama-3.1-8B-Instruct, max_seq_length: 8192, "
                     f"load_in_4bit: false}}\ntrain: {{batch_size: 8}}\noutput: {{dir: {tmp_path}}}\n")
    text = str(err.value)
    assert "not to fit" in text and "train.force" in text and "Smallest change that fits" in text
    assert session.cached_model_key() == before  # nothing was loaded
    from nbtune.train.config import build_config

    big = build_config(model={"name": "meta-llama/Llama-3.1-8B-Instruct", "max_seq_length": 8192,
                              "load_in_4bit": False}, train={"batch_size": 8, "force": True})
    assert check_fits(big) is None and check_fits(big.model_copy(), force=True) is None


def test_dry_run_checks_data_and_steps_without_loading_the_model(ip, tmp_path):
    from nbtune.train import session

    before = session.cached_model_key()
    report = run_cell(ip, f"%%finetune --dry-run\nmodel: {{max_seq_length: 128}}\n"
                          f"data: {{source: gsm8k, max_rows: 8, eval_rows: 4}}\ntrain: {{max_steps: 3, batch_size: 2, "
                          f"grad_accum: 2}}\noutput: {{dir: {tmp_path}}}\n")
    assert report.train_rows + sum(report.dropped.values()) == 8 and 0 < report.eval_rows <= 4
    assert (report.steps, report.format) == (3, "qa")
    assert report.epochs == pytest.approx(12 / report.train_rows) and 0 < report.trainable_tokens < report.train_tokens
    assert report.plan is not None and "dry run" in report.summary()
    assert session.cached_model_key() == before


@pytest.fixture(scope="module")
def smol_run(ip, tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("smol")
    ip.user_ns.update(steps=2, name="smol", out_dir=str(out))
    cell = """%%finetune --out {name} --set train.max_steps={steps} --set output.dir={out_dir}
model: {name: smollm2-135m-instruct, max_seq_length: 128}
data: {source: gsm8k, max_rows: 8, eval_rows: 4}
lora: {r: 8, alpha: 16}
train: {batch_size: 1, grad_accum: 1, lr: 1e-3, warmup_steps: 0, gradient_checkpointing: "off"}
"""
    with capture_output() as cap:
        value = run_cell(ip, cell)
    return value, cap, out


@pytest.mark.slow  # trains the embedded SmolLM2-135M (the quick tier trains tiny models)
def test_real_run_of_the_embedded_model_through_the_magic(ip, smol_run):
    from peft import PeftModel

    value, cap, out = smol_run
    result = ip.user_ns["smol"]
    assert value is result and result.steps == 2 and not result.interrupted
    assert result.config.train.max_steps == 2 and result.config.model.name == "smollm2-135m-instruct"
    assert isinstance(result.model, PeftModel)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "run.yaml").is_file()
    train = [r for r in result.metrics if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["loss"] > 0 and r["grad_norm"] > 0 and "lr" in r and r["tokens_per_s"] > 0
        assert r["elapsed_s"] > 0 and r["eta_s"] >= 0
    assert result.eval_loss_before is not None and result.eval_loss_after is not None


@pytest.mark.slow  # trains the embedded SmolLM2-135M (the quick tier trains tiny models)
def test_the_run_showed_the_dashboard_through_one_handle(smol_run):
    _value, cap, _out = smol_run
    shown = [o for o in cap.outputs if "application/vnd.plotly.v1+json" in o.data]
    assert shown and not shown[0].update and all(o.update for o in shown[1:])
    assert len({o.transient["display_id"] for o in shown}) == 1
    final = shown[-1].data["application/vnd.plotly.v1+json"]
    loss = next(t for t in final["data"] if t["name"] == "loss")
    assert loss["x"] == [1, 2]
    assert "step 2/2" in final["layout"]["title"]["text"]


@pytest.mark.slow  # trains the embedded SmolLM2-135M (the quick tier trains tiny models)
def test_the_trained_model_answers(smol_run, ip):
    reply = run_cell(ip, "smol.generate('What is 2+3?', max_new_tokens=4)")
    assert isinstance(reply, str) and reply


def test_cli_plan_dry_run_and_config_errors(tmp_path, capsys, tiny_model_dir, tiny_data):
    import yaml

    from nbtune.ui.cli import main

    from .conftest import tiny_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tiny_data, tmp_path / "out")))
    assert main(["finetune", str(path), "--plan", "--gpu", "T4", "--set", "model.name=llama-3.1-8b"]) == 0
    assert "nbtune plan: llama-3.1-8b on T4" in capsys.readouterr().out
    assert main(["finetune", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run:" in out and "train rows: 12" in out and "steps: 4 x 2 rows" in out
    assert not (tmp_path / "out" / "adapter").exists()
    assert main(["finetune", str(path), "--set", "train.optimizer=adam"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer" in err and "'adamw_8bit'" in err

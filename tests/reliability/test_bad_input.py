"""Bad input through the public doors (issue 8): every case is rejected with a message that names
the field / file / row and what is allowed or how to fix it, and nothing is lost: the previous
run's output folder (run.yaml, metrics, adapter, checkpoint), the data file and the config file
are byte-for-byte untouched and no file appears anywhere in the test's folder.

Doors: ``nbtune.finetune`` (Python), ``build_config`` and the CLI (``nbtune finetune bad.yaml``:
exit code 2, one line on stderr). Almost every case fails before a model is loaded; the few that
need a tokenizer use the tiny random Llama of ``conftest.py``.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import nbtune
from nbtune.models import ModelLoadError
from nbtune.train import ConfigError, DataError, build_config
from nbtune.ui.cli import main as cli_main

from .conftest import tiny_config

BAD = (ConfigError, DataError, ModelLoadError)


# ----------------------------------------------------------------------------- "nothing was lost"
def make_previous_run(out: Path) -> None:
    """What an earlier run left: config, metrics, adapter and a complete, resumable checkpoint."""
    (out / "adapter").mkdir(parents=True)
    ckpt = out / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (out / "run.yaml").write_text("previous: run\n")
    (out / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.5}\n')
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (out / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}')
    (ckpt / "nbtune.json").write_text('{"step": 2}')


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_model_dir, tiny_data):
    """A tmp folder with a previous run in ``out/`` and a copy of the data; ``world.check()`` asserts
    that every file there is unchanged and that nothing was added."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(tiny_data.read_bytes())
    out = tmp_path / "out"
    make_previous_run(out)

    class World:
        root, model, model_dir = tmp_path, tiny_model_dir, tiny_model_dir

        def config(self, **sections):
            cfg = tiny_config(tiny_model_dir, data, out)
            for section, values in sections.items():
                merge = isinstance(values, dict) and isinstance(cfg.get(section), dict)
                cfg[section] = {**cfg[section], **values} if merge else values
            return cfg

        def write(self, name, text=None, raw=None):
            path = tmp_path / name
            path.write_bytes(raw) if raw is not None else path.write_text(text)
            self.before = snapshot(tmp_path)
            return path

        def check(self):
            assert snapshot(tmp_path) == self.before, "a rejected run changed or added files"

    w = World()
    w.data, w.out = data, out
    w.before = snapshot(tmp_path)
    yield w


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message, got:\n{text}"
    return lines[0]


def run_cli(world, cfg, *extra, capsys):
    path = world.write("bad.yaml", yaml.safe_dump(cfg))
    capsys.readouterr()
    code = cli_main(["finetune", str(path), *extra])
    err = capsys.readouterr().err
    return code, err


def rejected(world, cfg, **kwargs) -> str:
    """The message of nbtune.finetune(cfg) (a bad-input error, raised before training)."""
    with pytest.raises(BAD) as info:
        nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False, **kwargs)
    world.check()
    return str(info.value)


# ----------------------------------------------------------------------------- config: the CLI door
CLI_CASES = {
    "unknown top-level key": ({"trian": {"max_steps": 3}}, ["did you mean 'train'", "allowed here: model, data"]),
    "unknown key, other library's name": ({"train": {"learning_rate": 1e-4}}, ["'train.learning_rate'",
                                                                                 "did you mean 'train.lr'"]),
    "lr given as text": ({"train": {"lr": "fast"}}, ["train.lr", "float", "'fast'"]),
    "batch size as a word": ({"train": {"batch_size": "two"}}, ["train.batch_size", "int", "'two'"]),
    "zero batch size": ({"train": {"batch_size": 0}}, ["train.batch_size", "> 0"]),
    "negative grad_accum": ({"train": {"grad_accum": -4}}, ["train.grad_accum", "> 0", "-4"]),
    "negative max_seq_length": ({"model": {"max_seq_length": -5}}, ["model.max_seq_length", "> 0"]),
    "rank 0": ({"lora": {"r": 0}}, ["lora.r", "> 0"]),
    "keep_checkpoints 0": ({"output": {"keep_checkpoints": 0}}, ["output.keep_checkpoints", ">= 1"]),
    "max_steps and epochs both set": ({"train": {"max_steps": 10, "epochs": 2}},
                                      ["train.max_steps", "train.epochs", "conflict"]),
    "packing with responses_only": ({"data": {"packing": True}},
                                    ["data.packing", "data.responses_only", "responses_only: false"]),
    "unknown model name": ({"model": {"name": "llama-9000"}},
                           ["model.name", "'llama-9000'", "smollm2-135m-instruct", "org/name", "local checkpoint"]),
    "missing model path": ({"model": {"name": "/no/such/model/dir"}}, ["model.name", "/no/such/model/dir",
                                                                         "does not exist"]),
    "max_seq_length above the model's limit": ({"model": {"max_seq_length": 4096}},
                                               ["model.max_seq_length=4096", "512", "max_position_embeddings",
                                                "1..512"]),
    "missing data file": ({"data": {"source": "/no/such/data.jsonl"}}, ["data.source", "/no/such/data.jsonl",
                                                                         "does not exist"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_config_with_exit_2_and_one_line(case, world, capsys):
    patch, needles = CLI_CASES[case]
    cfg = world.config(**patch)
    code, err = run_cli(world, cfg, capsys=capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("nbtune: error: "), err
    for needle in needles:
        assert needle in line, line
    world.check()


def test_cli_set_is_never_evaluated_and_bad_set_exits_2(world, capsys):
    marker = world.root / "pwned"
    cfg = world.config()
    code, err = run_cli(world, cfg, "--set", f"train.lr=__import__('os').system('touch {marker}')", capsys=capsys)
    assert code == 2 and "train.lr" in one_line(err) and not marker.exists()
    code, err = run_cli(world, cfg, "--set", "train.lr", capsys=capsys)
    assert code == 2 and "section.key=value" in one_line(err)
    world.check()


def test_cli_yaml_tags_are_not_executed(world, capsys):
    marker = world.root / "pwned"
    path = world.write("evil.yaml", f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    code = cli_main(["finetune", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "not valid YAML" in one_line(err) and not marker.exists()
    world.check()


def test_cli_missing_config_file(world, capsys):
    code = cli_main(["finetune", str(world.root / "nope.yaml")])
    assert code == 2 and "nope.yaml" in one_line(capsys.readouterr().err)
    world.check()


def test_the_real_command_exits_2_with_one_line(world):
    path = world.write("bad.yaml", yaml.safe_dump(world.config(lora={"r": 0})))
    proc = subprocess.run([sys.executable, "-m", "nbtune", "finetune", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "lora.r" in one_line(proc.stderr) and "Traceback" not in proc.stderr
    world.check()


# ----------------------------------------------------------------------------- output folder
def test_output_dir_that_is_a_file(world):
    target = world.write("a-file", "keep me\n")
    msg = rejected(world, world.config(output={"dir": str(target)}))
    assert "output.dir" in msg and "is a file" in msg


def test_output_dir_under_a_file(world):
    target = world.write("a-file", "keep me\n")
    msg = rejected(world, world.config(output={"dir": str(target / "run")}))
    assert "output.dir" in msg and "cannot be created" in msg


def test_unwritable_output_dir_is_found_before_the_model_loads(world, monkeypatch):
    import transformers

    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == world.out else real_access(p, mode))
    msg = rejected(world, world.config())
    assert "output.dir" in msg and "not writable" in msg and not loads


# ----------------------------------------------------------------------------- data: the Python door
def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


DATA_CASES = {
    "empty file": ("empty.jsonl", "", {}, ["empty.jsonl", "is empty"]),
    "malformed JSON on line 3": ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', {},
                                 ["bad.jsonl line 3", "malformed JSON"]),
    "not UTF-8": ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, ["latin1.jsonl line 2", "not UTF-8"]),
    "missing columns": ("cols.jsonl", _jsonl([{"q": "x", "a": "y"}]), {},
                        ["cannot tell the format", "prompt, completion", "data.format", "data.columns"]),
    "missing column on row 2": ("qa.jsonl", _jsonl([{"question": "q", "answer": "a"}, {"question": "q2"}]),
                                {"format": "qa"}, ["row 2", "missing column 'answer'"]),
    "wrong chat role": ("roles.jsonl", _jsonl([{"messages": [{"role": "user", "content": "q"},
                                                             {"role": "wizard", "content": "a"}]}]), {},
                        ["row 1", "'wizard'", "allowed roles: system, user, assistant"]),
    "no assistant turn": ("user.jsonl", _jsonl([{"messages": [{"role": "user", "content": "q"}]}]), {},
                          ["row 1", "no assistant turn"]),
    "row not an object": ("rows.jsonl", '{"text": "a"}\n[1, 2]\n', {}, ["rows.jsonl row 2", "expected an object"]),
    "JSON that is not a list": ("d.json", json.dumps({"text": "a"}), {}, ["d.json", "expected a JSON list"]),
    "unsupported file type": ("notes.txt", "hello\n", {}, ["notes.txt", "unsupported file type", ".jsonl"]),
    "column mapping to a missing column": ("map.jsonl", _jsonl([{"q": "x", "a": "y"}]),
                                           {"format": "prompt_completion", "columns": {"prompt": "q",
                                                                                       "completion": "answer"}},
                                           ["row 1", "missing column 'completion'"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_rejected_before_anything_loads(case, world, monkeypatch):
    import transformers

    name, content, data_cfg, needles = DATA_CASES[case]
    path = world.write(name, **({"raw": content} if isinstance(content, bytes) else {"text": content}))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded for bad data"))
    msg = rejected(world, world.config(data={"source": str(path), **data_cfg}))
    for needle in needles:
        assert needle in msg, msg


def test_all_rows_too_long_says_how_many_and_why(world, capsys):
    rows = [{"prompt": "word " * 200, "completion": "a"}] * 3
    path = world.write("long.jsonl", _jsonl(rows))
    cfg = world.config(data={"source": str(path)})
    with pytest.raises(DataError) as info:  # the dry run (tokenizer only) ...
        nbtune.finetune(cfg, dry_run=True)
    assert "all 3 rows were dropped" in str(info.value) and "max_seq_length=64" in str(info.value)
    world.check()
    msg = rejected(world, cfg)  # ... and the run itself (tiny model loaded), which writes nothing
    assert "all 3 rows were dropped" in msg and "raise model.max_seq_length" in msg
    code, err = run_cli(world, cfg, capsys=capsys)
    errors = [line for line in err.splitlines() if "nbtune: error" in line]  # (after the model's load bar)
    assert code == 2 and len(errors) == 1 and "all 3 rows were dropped" in errors[0]
    world.check()


def test_model_dir_without_config_json(world):
    empty = world.root / "not-a-model"
    empty.mkdir()
    world.before = snapshot(world.root)
    msg = rejected(world, world.config(model={"name": str(empty)}))
    assert "without config.json" in msg


def test_dry_run_checks_the_same_inputs(world):
    with pytest.raises(ModelLoadError, match="model.max_seq_length=4096"):
        nbtune.finetune(world.config(model={"max_seq_length": 4096}), dry_run=True)
    with pytest.raises(ConfigError, match="output.dir"):
        nbtune.finetune(world.config(output={"dir": str(world.data / "x")}), dry_run=True)
    world.check()


def test_epochs_alone_and_overrides_do_not_conflict():
    assert build_config(train={"epochs": 2}).train.max_steps is None
    assert build_config(build_config(train={"epochs": 2}), train={"max_steps": 5}).train.epochs is None
    assert build_config(data={"packing": True, "responses_only": False}).data.packing


# ----------------------------------------------------------------------------- environment
BNB_SCRIPT = textwrap.dedent("""
    import json, sys
    {block}
    import nbtune
    from nbtune.models import ModelLoadError
    try:
        nbtune.finetune(json.loads(sys.argv[1]), dashboard=False, progress=False)
    except ModelLoadError as e:
        print("MESSAGE:", e)
""")


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_bitsandbytes_missing_or_broken_says_the_fix(world, how, tmp_path_factory):
    """A pre-quantized (bitsandbytes) checkpoint needs bitsandbytes even on a CPU: without it, the
    message says what is wrong and how to fix it, and nothing is written."""
    model = tmp_path_factory.mktemp("bnb-model")
    config = json.loads((world.model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))
    env = dict(os.environ)
    if how == "missing":
        block = "sys.modules['bitsandbytes'] = None  # import bitsandbytes -> ImportError"
    else:
        fake = tmp_path_factory.mktemp("fake-bnb")
        (fake / "bitsandbytes").mkdir()
        (fake / "bitsandbytes" / "__init__.py").write_text("raise OSError('libbitsandbytes_cuda.so: cannot open')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
        block = ""
    cfg = world.config(model={"name": str(model)})
    proc = subprocess.run([sys.executable, "-c", BNB_SCRIPT.format(block=block), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert "MESSAGE:" in proc.stdout, proc.stdout + proc.stderr
    msg = proc.stdout.split("MESSAGE:", 1)[1]
    assert "bitsandbytes" in msg and "pip install -U bitsandbytes" in msg and "model.load_in_4bit: false" in msg
    if how == "broken":  # transformers and peft import it too: caught where nbtune imports them
        assert "libbitsandbytes_cuda.so" in msg and "pip uninstall bitsandbytes" in msg
    world.check()


# ----------------------------------------------------------------------------- security
def test_trust_remote_code_is_off_all_the_way_to_from_pretrained(world, monkeypatch):
    import transformers

    from nbtune.models import load_model

    assert build_config().model.trust_remote_code is False
    calls = []

    class Stop(Exception):
        pass

    def record_and_stop(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record_and_stop)
        with pytest.raises(Stop):
            nbtune.finetune(world.config(), dashboard=False, progress=False, reuse_model=False)
    assert calls and calls[0]["trust_remote_code"] is False
    world.check()  # a crash while loading the model leaves the previous run alone too

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(world.model_dir), max_seq_length=64)
    assert seen == [False, False]


def test_weights_are_safetensors_and_a_crash_during_save_keeps_the_last_checkpoint(world, monkeypatch):
    """A real (tiny) run saving every step; the second checkpoint save dies halfway. The first
    checkpoint stays complete and loadable, no half-written folder is left, and every weight file
    nbtune wrote is safetensors (no pickled .bin / .pt weights)."""
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nbtune.train.checkpoint import checkpoints_dir, complete_checkpoints, latest_checkpoint

    out = world.root / "fresh"
    real_save = transformers.Trainer._save_checkpoint
    saves = []

    def crashing_save(self, model, trial):
        saves.append(self.state.global_step)
        if len(saves) == 1:
            return real_save(self, model, trial)
        half = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        half.mkdir(parents=True)
        (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", crashing_save)
    cfg = world.config(output={"dir": str(out)}, train={"max_steps": 3, "save_steps": 1})
    with pytest.raises(OSError, match="No space left"):
        nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False)
    assert saves == [1, 2]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert sorted(p.name for p in checkpoints_dir(out).iterdir()) == ["checkpoint-1"]  # no staging left
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 1
    base = AutoModelForCausalLM.from_pretrained(world.model_dir)
    PeftModel.from_pretrained(base, ckpt)  # loadable

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real_save)
    result = nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False)
    weights = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth",
                                                                          ".pkl", ".ckpt")]
    weight_names = {p.name for p in weights}
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not {p.name for p in result.adapter_dir.iterdir()} & {"adapter_model.bin", "pytorch_model.bin"}
    assert not [p for p in result.adapter_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    # checkpoints hold optimizer / scheduler / RNG state as torch files, but their weights are safetensors
    assert not weight_names & {"adapter_model.bin", "pytorch_model.bin", "model.pt"}
    assert all((c / "adapter_model.safetensors").is_file() for c in complete_checkpoints(out))

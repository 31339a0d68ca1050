"""Security (issue 8): weights are written only as safetensors; ``trust_remote_code`` is off unless
the config asks, and then reaches transformers as asked (a dry run never runs the model's code);
config values are data, never code (YAML tags that build Python objects are refused, text that
looks like code stays text); the pickled states of a checkpoint are read back with
``weights_only=True``, so a tampered one cannot run code on resume."""
import json
import pickle

import pytest
import yaml

import nbtune
from nbtune.train import ConfigError, build_config
from nbtune.train.checkpoint import MARKER, complete_checkpoints, manifest

from .conftest import one_line, run_cli, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_data):
    out = tmp_path_factory.mktemp("secure") / "run"
    cfg = tiny_config(tiny_model_dir, tiny_data, out, max_steps=2, save_steps=1)
    cfg["output"]["export"] = ["adapter", "merged"]
    return cfg, nbtune.finetune(cfg, dashboard=False, progress=False, reuse_model=False)


def test_weights_are_safetensors_only(finished_run):
    """The adapter and the merged model are safetensors; a checkpoint's only pickles are the
    trainer's optimizer / scheduler / RNG states (read back with weights_only=True, see below)."""
    _cfg, result = finished_run
    out = result.output_dir
    for folder in (result.adapter_dir, result.merged_dir):
        names = {p.name for p in folder.iterdir()}
        assert any(n.endswith(".safetensors") for n in names), names
        assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names
    checkpoints = complete_checkpoints(out)
    assert checkpoints
    for ckpt in checkpoints:
        assert (ckpt / "adapter_model.safetensors").is_file()
        pickles = {p.name for p in ckpt.iterdir() if p.name.endswith(PICKLE_SUFFIXES)}
        assert pickles <= {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin"}, pickles
    outside = [p for p in out.rglob("*") if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)
               and "checkpoints" not in p.parts]
    assert not outside, outside


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creating the file proves the pickle ran code


def test_a_tampered_checkpoint_cannot_run_code_on_resume(finished_run, tmp_path):
    cfg, result = finished_run
    ckpt = complete_checkpoints(result.output_dir)[-1]
    marker = tmp_path / "pwned"
    original = (ckpt / "optimizer.pt").read_bytes()
    original_marker = (ckpt / MARKER).read_text()
    exploit = pickle.dumps(_Exploit(marker))
    (ckpt / "optimizer.pt").write_bytes(exploit)
    run = dict(dashboard=False, progress=False, reuse_model=False, train={**cfg["train"], "max_steps": 4})
    try:
        # the manifest written with the checkpoint no longer matches: refused before anything is read
        with pytest.raises(ConfigError, match=f"cannot be resumed from: optimizer.pt has {len(exploit)} bytes where"):
            nbtune.finetune(cfg, resume=str(ckpt), **run)
        assert not marker.exists()
        # a tamperer who rewrote the manifest too still meets torch.load(weights_only=True)
        meta = json.loads(original_marker)
        meta["files"] = manifest(ckpt)
        (ckpt / MARKER).write_text(json.dumps(meta))
        with pytest.raises(Exception) as info:
            nbtune.finetune(cfg, resume=str(ckpt), **run)
        assert not marker.exists()
        assert "weights_only" in str(info.value) or "Unpickl" in type(info.value).__name__, info.value
    finally:
        (ckpt / "optimizer.pt").write_bytes(original)
        (ckpt / MARKER).write_text(original_marker)


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
        with pytest.raises(Stop):  # ... and exactly as asked when the config says so
            nbtune.finetune(world.config(model={"trust_remote_code": True}), dashboard=False, progress=False,
                            reuse_model=False)
    assert [c["trust_remote_code"] for c in calls] == [False, True]
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


@pytest.mark.parametrize("text", [
    "model: !!python/object/apply:os.system ['touch {marker}']\n",
    "train: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    "data: !!python/name:os.system\n",
])
def test_yaml_tags_that_build_objects_are_refused(text, world, capsys):
    from nbtune.ui.cli import main as cli_main

    marker = world.root / "pwned"
    path = world.write("evil.yaml", text.format(marker=marker))
    code = cli_main(["finetune", str(path)])
    assert code == 2 and "not valid YAML" in one_line(capsys.readouterr().err) and not marker.exists()
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(text.format(marker=marker))
    assert not marker.exists()
    world.check()


def test_text_that_looks_like_code_stays_text(world, capsys):
    marker = world.root / "pwned"
    code_text = f"__import__('os').system('touch {marker}')"
    cfg = build_config(yaml.safe_dump({"data": {"system_prompt": code_text}, "model": {"name": code_text}}))
    assert cfg.data.system_prompt == code_text and cfg.model.name == code_text and not marker.exists()
    code, err = run_cli(world, world.config(train={"lr": code_text}), capsys=capsys)
    assert code == 2 and "train.lr" in one_line(err) and not marker.exists()
    code, err = run_cli(world, world.config(), "--set", f"train.lr={code_text}", capsys=capsys)
    assert code == 2 and "train.lr" in one_line(err) and not marker.exists()
    world.check()


def custom_code_model(world, name: str, marker, local_class: bool):
    """The tiny model with a custom tokenizer class in a .py file beside it (tokenizer_config.json's
    auto_map), whose import creates ``marker``: proof that the checkpoint's code ran.
    ``local_class``: the config still names a transformers class too (a fallback without the code)."""
    import json
    import shutil

    folder = world.root / name
    shutil.copytree(world.model_dir, folder)
    (folder / "custom_tok.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tok.CustomTokenizer"]}
    if not local_class:
        config["tokenizer_class"] = "CustomTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from .conftest import snapshot

    world.before = snapshot(world.root)
    return folder


def test_a_dry_run_never_runs_the_models_code(world, capfd):
    """model.trust_remote_code: true runs the checkpoint's code in a real run (as asked, with a
    line saying so), never in a dry run: the dry run loads the tokenizer without it, and says so."""
    from transformers import AutoTokenizer

    from nbtune.models import ModelLoadError

    marker = world.root.parent / f"{world.root.name}-ran"
    folder = custom_code_model(world, "custom-code", marker, local_class=True)
    cfg = world.config(model={"name": str(folder), "trust_remote_code": True})
    report = nbtune.finetune(cfg, dry_run=True)
    assert report.train_rows > 0 and not marker.exists()
    assert "a dry run runs no code shipped with the model" in capfd.readouterr().err

    strict = custom_code_model(world, "custom-only", marker, local_class=False)
    with pytest.raises(ModelLoadError) as info:
        nbtune.finetune(world.config(model={"name": str(strict), "trust_remote_code": True}), dry_run=True)
    msg = str(info.value)
    assert "exists only as custom code" in msg and "runs no such code" in msg and "trust_remote_code: true" in msg
    assert not marker.exists()
    world.check()

    AutoTokenizer.from_pretrained(str(strict), trust_remote_code=True)  # the code is live: loading it runs it
    assert marker.exists()
    marker.unlink()

"""A model that nbtune cannot use as given (issue 8) is rejected with one paragraph naming the
model folder or id, what is wrong and the fix, before the model loads and before anything is
written (``world.check()``): weights only as pickle files, no tokenizer."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import nbtune
from nbtune.models import ModelLoadError

from .conftest import one_line, rejected, run_cli, snapshot


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))


def copy_model(world, name, skip=()):
    """A copy of the tiny model folder without the files in ``skip``, in the world (which must keep
    it unchanged from then on)."""
    folder = world.root / name
    folder.mkdir()
    for f in world.model_dir.iterdir():
        if f.name not in skip:
            shutil.copy(f, folder / f.name)
    world.before = snapshot(world.root)
    return folder


def pickle_model(world, extra=None):
    """The tiny model with its weights saved by torch.save as pytorch_model.bin (a real pickle
    file), no safetensors. ``extra``: one more entry in the pickled dict (a numpy array makes
    torch's weights_only loader refuse the file: "Weights only load failed")."""
    folder = copy_model(world, "pickled", skip=("model.safetensors",))
    state = load_file(world.model_dir / "model.safetensors")
    if extra is not None:
        state["extra"] = extra
    torch.save(state, folder / "pytorch_model.bin")
    world.before = snapshot(world.root)
    return folder


@pytest.mark.parametrize("extra", ["plain state dict", "numpy inside"])
def test_pickle_only_weights_are_refused_with_the_conversion(world, no_model_load, extra, capsys):
    import numpy as np

    folder = pickle_model(world, extra=np.zeros(3) if extra == "numpy inside" else None)
    cfg = world.config(model={"name": str(folder)})
    msg = rejected(world, cfg)
    for needle in (str(folder), "pytorch_model.bin", "safetensors only", "pickle file can run code",
                   "save_pretrained(", "safe_serialization=True", "environment you trust"):
        assert needle in msg, msg
    assert "weights_only" not in msg and "Traceback" not in msg
    code, err = run_cli(world, cfg, capsys=capsys)
    assert code == 2 and "safetensors only" in one_line(err)
    with pytest.raises(ModelLoadError, match="safetensors only"):  # the Python loader says the same
        nbtune.load_model(str(folder), max_seq_length=64)
    world.check()


def test_a_folder_without_tokenizer_files_names_them_and_the_fix(world, no_model_load, capsys):
    tokenizer_files = {p.name for p in world.model_dir.iterdir() if "token" in p.name or p.suffix == ".jinja"}
    folder = copy_model(world, "no-tokenizer", skip=tokenizer_files)
    cfg = world.config(model={"name": str(folder)})
    msg = rejected(world, cfg)
    for needle in (str(folder), "has no tokenizer", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "AutoTokenizer.from_pretrained(", ".save_pretrained("):
        assert needle in msg, msg
    assert "sentencepiece" not in msg
    with pytest.raises(ModelLoadError, match="has no tokenizer"):  # the dry run too
        nbtune.finetune(cfg, dry_run=True)
    code, err = run_cli(world, cfg, "--dry-run", capsys=capsys)
    assert code == 2 and "has no tokenizer" in one_line(err)
    world.check()


@pytest.mark.parametrize("targets, bad", [(["q_projj"], "'q_projj'"), (["q_proj", "v_projj"], "'v_projj'"),
                                          ("mlp\\.nothing", "'mlp\\\\.nothing'")],
                         ids=["a typo", "one of two", "a regular expression"])
def test_lora_targets_the_model_lacks_list_its_linear_layers(world, no_model_load, targets, bad, capsys):
    cfg = world.config(lora={"targets": targets})
    msg = rejected(world, cfg)  # decided from config.json on the meta device: the weights never load
    for needle in ("lora.targets", bad, "no module of this model (llama)",
                   "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head", "'all-linear'"):
        assert needle in msg, msg
    if len(targets) == 2 and isinstance(targets, list):
        assert "'q_proj'" not in msg.split("no module")[0]  # the good one is not blamed
    code, err = run_cli(world, cfg, capsys=capsys)
    assert code == 2 and "lora.targets" in one_line(err) and "NoMatchingPeftModule" not in err
    world.check()


def test_add_lora_on_a_loaded_model_says_the_same(world):
    """A hub model is checked once loaded (add_lora), with the same message, never peft's error."""
    model, _tok = nbtune.load_model(str(world.model_dir), max_seq_length=64)
    with pytest.raises(ModelLoadError, match=r"lora.targets: 'q_projj' matches no module.*Its linear layers: q_proj"):
        nbtune.add_lora(model, r=4, targets=["q_projj"], gradient_checkpointing="off")
    assert nbtune.add_lora(model, r=4, targets=["q_proj", "v_proj"], gradient_checkpointing="off") is not None


# ----------------------------------------------------------------------------- hub ids without a hub
class _Hub:
    """A stand-in for the hub on 127.0.0.1 (HF_ENDPOINT points at it): answers a gated id's
    auth-check as the hub does (403, X-Error-Code: GatedRepo), any other id with 404
    RepoNotFound, and records every request path."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        paths = self.paths = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                gated = self.path.startswith("/api/models/meta-llama/")
                self.send_response(403 if gated else 404)
                self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
                self.send_header("X-Error-Message", "Access to model meta-llama/Llama-3.1-8B is restricted."
                                 if gated else "Repository not found")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Refusing:
    """A port on 127.0.0.1 that reads each request's first line and closes the connection without
    an answer (a hub that cannot be reached), recording the lines: transformers' downloads (and
    their retries) would ask for ``/resolve/`` paths."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode())
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()


def cli_subprocess(world, cfg, env_changes):
    """``python -m nbtune finetune bad.yaml --dry-run`` in a fresh process with ``env_changes``
    (None removes a variable); (exit code, stderr)."""
    import os
    import subprocess
    import sys

    import yaml

    path = world.write("hub.yaml", yaml.safe_dump(cfg))
    env = dict(os.environ)
    for key, value in env_changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    proc = subprocess.run([sys.executable, "-m", "nbtune", "finetune", str(path), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env=env)
    return proc.returncode, proc.stderr


def error_line(err: str) -> str:
    """The one ``nbtune: error`` line of a run's stderr (an installed library may print its own
    notes on import, e.g. bitsandbytes' CPU backend); no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("nbtune: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


ONLINE = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_TOKEN": None}


def test_a_hub_id_with_the_hub_switched_off_fails_at_once(world, monkeypatch, no_model_load, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = world.config(model={"name": "some-org/some-model-7b"})
    msg = rejected(world, cfg)
    for needle in ("model.name: 'some-org/some-model-7b' is a hub id", "HF_HUB_OFFLINE=1", "not in the local hub cache",
                   "huggingface-cli download some-org/some-model-7b", "local checkpoint folder"):
        assert needle in msg, msg
    code, err = run_cli(world, cfg, "--dry-run", capsys=capsys)
    assert code == 2 and "HF_HUB_OFFLINE=1" in one_line(err)
    world.check()


def test_a_hub_that_cannot_be_reached_is_one_line_without_retries(world):
    hub = _Refusing()
    try:
        code, err = cli_subprocess(world, world.config(model={"name": "some-org/some-model-7b"}),
                                   {**ONLINE, "HF_ENDPOINT": hub.url})
    finally:
        hub.close()
    line = error_line(err)
    assert code == 2 and "Retrying" not in err, err
    for needle in ("'some-org/some-model-7b' is a hub id", f"the hub ({hub.url}) cannot be reached",
                   "connect to the network", "huggingface-cli download"):
        assert needle in line, line
    probes = [r for r in hub.requests if "/some-org/" in r]
    assert probes == ["GET /api/models/some-org/some-model-7b/auth-check HTTP/1.1"], hub.requests  # one, no retry
    world.check()


def test_a_gated_hub_id_names_the_licence_step_and_an_ungated_copy(world, monkeypatch):
    """The hub's real answer for a gated model (through huggingface_hub's own GatedRepoError), from
    a local stand-in for the hub: in the CLI (a fresh process with HF_ENDPOINT) and in Python."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError

    from nbtune.models.hub import check_hub_model

    hub = _Hub()
    try:
        code, err = cli_subprocess(world, world.config(model={"name": "meta-llama/Llama-3.1-8B"}),
                                   {**ONLINE, "HF_ENDPOINT": hub.url})
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        with pytest.raises(ModelLoadError) as gated:
            check_hub_model("meta-llama/Llama-3.1-8B")
        with pytest.raises(ModelLoadError) as missing:
            check_hub_model("nobody/no-such-model")
    finally:
        hub.close()
    line = error_line(err)
    assert code == 2, err
    for needle in ("'meta-llama/Llama-3.1-8B' is a gated model", "licence",
                   f"accept it on {hub.url}/meta-llama/Llama-3.1-8B", "huggingface-cli login", "HF_TOKEN",
                   "ungated copy", "unsloth/", "NousResearch/", "for example"):
        assert needle in line, line
    assert isinstance(gated.value.__context__, GatedRepoError) and str(gated.value) in line
    assert "is not on the hub" in str(missing.value) and "private" in str(missing.value)
    assert hub.paths.count("/api/models/meta-llama/Llama-3.1-8B/auth-check") == 2
    world.check()

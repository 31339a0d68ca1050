"""The export doors on a real (tiny, 4-step) run: ``output.export: [adapter, merged, gguf]``,
``result.export(...)``, ``nbtune export RUN_DIR``, and ``push_to_hub`` against a mock Hub server
on 127.0.0.1 (HF_ENDPOINT), which records every request it gets."""
import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import textwrap

import pytest

from .gguf_fields import field_value

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    import nbtune

    root = tmp_path_factory.mktemp("run-export")
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "completion": f"{2 * i}."}) + "\n"
                            for i in range(16)))
    cfg = {"model": {"name": str(tiny_model_dir), "max_seq_length": 64},
           "data": {"source": str(data), "eval_split": 0.25},
           "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 4, "batch_size": 1, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1,
                     "gradient_checkpointing": "off", "optimizer": "adamw", "seed": 1},
           "output": {"dir": str(root / "out"), "export": ["adapter", "merged", "gguf"], "gguf_quant": "f16"}}
    return nbtune.finetune(cfg, dashboard=False)


def test_run_exports_what_the_config_asks(run):
    import gguf

    out = run.output_dir
    assert (out / "merged" / "model.safetensors").is_file() and run.merged_dir == out / "merged"
    files = list((out / "gguf").glob("*.gguf"))
    assert len(files) == 1 and files[0].name.endswith("-f16.gguf")
    assert files[0].with_suffix(".Modelfile").is_file()
    reader = gguf.GGUFReader(files[0])
    assert field_value(reader.fields["general.architecture"]) == "llama"
    path = run.export("gguf", quant="q8_0", out=out / "q8")
    assert path.name.endswith("-q8_0.gguf") and path.is_file()


def test_cli_export(run, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "nbtune", "export", str(run.output_dir), "--format", "gguf",
                           "--quant", "q8_0", "--out", str(tmp_path / "cli")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("-q8_0.gguf") and "ollama create" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "nbtune", "export", str(tmp_path), "--format", "gguf"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("nbtune: error:")]
    assert len(lines) == 1 and "not a finished nbtune run folder" in lines[0]


class MockHub(http.server.BaseHTTPRequestHandler):
    """The Hub endpoints huggingface_hub calls to create a repo and commit small files."""

    requests: list = []
    files: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        MockHub.requests.append(("POST", self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            host = f"http://127.0.0.1:{self.server.server_port}"
            return self._reply(200, {"url": f"{host}/{repo.get('organization')}/{repo['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's metadata block
            MockHub.card_meta = json.loads(body)
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    MockHub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            host = f"http://127.0.0.1:{self.server.server_port}"
            return self._reply(200, {"commitUrl": f"{host}/me/tiny-sums/commit/{'1' * 40}", "commitOid": "1" * 40,
                                     "pullRequestUrl": None})
        return self._reply(404, {"error": f"mock hub: no {self.path}"})

    def do_GET(self):
        MockHub.requests.append(("GET", self.path, self.headers.get("Authorization")))
        return self._reply(404, {"error": f"mock hub: no {self.path}"})


PUSH = textwrap.dedent("""
    import sys
    from nbtune.export.hub import push_to_hub
    print(push_to_hub(sys.argv[1], "me/tiny-sums", formats=["adapter", "gguf"], quant="f16"))
""")


def test_push_to_hub_against_a_mock_hub(run):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MockHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": "hf_mocktoken",
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", PUSH, str(run.output_dir)], capture_output=True, text=True,
                              env=env, timeout=600)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("/me/tiny-sums")
    assert all(auth == "Bearer hf_mocktoken" for _, _, auth in MockHub.requests)
    names = set(MockHub.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert any(n.startswith("gguf/") and n.endswith(".gguf") for n in names)
    assert any(n.startswith("gguf/") and n.endswith(".Modelfile") for n in names)
    card = MockHub.files["README.md"].decode()
    assert "held-out loss" in card and "before training" in card and "tags:" in card
    for name, content in MockHub.files.items():  # nothing secret or local travels
        if name.endswith((".md", ".json", ".Modelfile")):
            text = content.decode()
            assert "hf_mocktoken" not in text and str(run.output_dir) not in text, name
            assert "/tmp/" not in text and os.path.expanduser("~") + "/" not in text, name


def test_push_to_hub_fails_fast(run, monkeypatch):
    from nbtune.export import ExportError
    from nbtune.export.hub import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE") as e:
        push_to_hub(run.output_dir, "me/x", token="hf_x")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ExportError, match="needs a Hugging Face token"):
        push_to_hub(run.output_dir, "me/x")


def test_gguf_export_problems_are_found_before_training(tiny_model_dir, tmp_path, monkeypatch):
    """output.export: [gguf] with a k-quant and no llama.cpp quantizer stops the run (and the dry run)
    before anything trains (an architecture the GGUF writer lacks is checked at the same point)."""
    import shutil

    import nbtune
    from nbtune.export import ExportError

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "completion": "2"}) + "\n")
    cfg = {"model": {"name": str(tiny_model_dir), "max_seq_length": 32}, "data": {"source": str(data),
                                                                               "eval_split": None},
           "train": {"max_steps": 1, "warmup_steps": 0},
           "output": {"dir": str(tmp_path / "out"), "export": ["adapter", "gguf"], "gguf_quant": "q4_k_m"}}
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    for kwargs in ({"dry_run": True}, {}):
        with pytest.raises(ExportError, match="llama-quantize"):
            nbtune.finetune(cfg, dashboard=False, **kwargs)
    assert not (tmp_path / "out" / "adapter").exists()

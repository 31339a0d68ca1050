"""The benchmark peers without a GPU: the shared shape table, nbtune_peer's token draws against
the peer scripts' own statements, its gradient-checkpointing assertions, the long-context
checkpoint view, the OOM line, and the T4-emulation SDPA switch."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
PEERS_DIR = os.path.join(BENCH, "peers")
sys.path.insert(0, PEERS_DIR)  # what the peer scripts themselves do
import bench_common  # noqa: E402
from bench_scripts import load_script  # noqa: E402


nbtune_peer = load_script("nbtune_bench_peer", os.path.join(BENCH, "nbtune_peer.py"))

PEER_SCRIPTS = [os.path.join(PEERS_DIR, "hf_qlora_baseline.py"), os.path.join(PEERS_DIR, "unsloth_peer.py")]


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def test_original_shapes_unchanged():
    # as the original peer scripts had them (the checkpoints of the reference figures)
    assert bench_common.SHAPES["llama2-7b"] == dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000)
    assert bench_common.SHAPES["llama3-8b"] == dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)
    cfg = bench_common.config_for("llama3-8b")
    assert type(cfg).__name__ == "LlamaConfig" and cfg.max_position_embeddings == 8192


@pytest.mark.parametrize("shape,billions,cls", [
    ("llama2-7b", 6.738, "LlamaForCausalLM"), ("llama3-8b", 8.030, "LlamaForCausalLM"),
    ("mistral-7b", 7.248, "MistralForCausalLM"), ("qwen2.5-7b", 7.616, "Qwen2ForCausalLM"),
    ("gemma-2-9b", 9.242, "Gemma2ForCausalLM"), ("phi-3-mini", 3.821, "LlamaForCausalLM"),
])
def test_shapes_have_the_real_models_sizes(shape, billions, cls):
    """Parameter counts of the released models (meta device: no memory, no time)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench_common.config_for(shape))
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=2e-3)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(bench_common.LORA_TARGETS) <= names  # every peer can put LoRA on the same seven projections


def test_peer_copies_take_shapes_from_the_shared_table():
    for path in PEER_SCRIPTS + [os.path.join(BENCH, "nbtune_peer.py")]:
        source = open(path).read()
        assert "SHAPES = {" not in source, f"{path} defines its own shape table"
        assert "bench_common" in source


# ------------------------------------------------------------------------------------------------
# tokens: nbtune_peer draws what the peers draw
# ------------------------------------------------------------------------------------------------
def peer_draw_statements(path):
    """The peer's `V = ...`, `g = ...` and, from its loop, `ids = ...` statements, as source."""
    tree = ast.parse(open(path).read())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    found = {}
    for node in ast.walk(run):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("V", "g", "ids"):
                found[node.targets[0].id] = ast.unparse(node)
    loop = next(n for n in ast.walk(run) if isinstance(n, ast.For))
    assert ast.unparse(loop.iter) == "range(warmup + steps)"
    assert ast.unparse(loop.body[0]) == found["ids"], "the batch must be the loop's first statement"
    return found


@pytest.mark.parametrize("path", PEER_SCRIPTS, ids=["hf", "unsloth"])
def test_token_draws_match_the_peers(path):
    found = peer_draw_statements(path)
    assert found["V"] == "V = model.config.vocab_size"
    assert found["g"] == "g = torch.Generator(device='cuda').manual_seed(1)"
    # run the peer's own statements (on the CPU generator) and nbtune_peer's, 11 steps, 3 shapes
    for vocab, batch, seqlen in ((128256, 2, 64), (32000, 1, 100), (7, 3, 5)):
        scope = {"torch": torch, "batch": batch, "seqlen": seqlen, "V": vocab}
        exec(found["g"].replace("'cuda'", "'cpu'"), scope)
        theirs = []
        for _ in range(11):
            exec(found["ids"].replace('"cuda"', '"cpu"').replace("'cuda'", "'cpu'"), scope)
            theirs.append(scope["ids"])
        g = nbtune_peer.token_generator("cpu")
        ours = [nbtune_peer.draw_tokens(g, vocab, batch, seqlen, "cpu") for _ in range(11)]
        for a, b in zip(theirs, ours):
            assert a.shape == (batch, seqlen) and torch.equal(a, b)


def test_nbtune_peer_loop_uses_the_model_vocab_and_one_draw_per_step():
    tree = ast.parse(open(os.path.join(BENCH, "nbtune_peer.py")).read())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    sources = [ast.unparse(n) for n in ast.walk(run) if isinstance(n, ast.Assign)]
    assert "V = model.config.vocab_size" in sources
    assert "g = token_generator('cuda')" in sources
    loop = next(n for n in ast.walk(run) if isinstance(n, ast.For))
    assert ast.unparse(loop.iter) == "range(warmup + steps)"
    assert ast.unparse(loop.body[0]) == "ids = draw_tokens(g, V, batch, seqlen, 'cuda')"
    assert "labels=ids" in ast.unparse(loop) and "lr=0.0002" in ast.unparse(run)


# ------------------------------------------------------------------------------------------------
# gradient checkpointing assertions, on a tiny model through nbtune's public API
# ------------------------------------------------------------------------------------------------
def tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("mode", ["offload", "plain"])
def test_checkpointing_is_asserted_structurally_and_at_run_time(mode):
    import nbtune

    model = nbtune.add_lora(tiny_model(), r=4, alpha=4, dropout=0.0, targets=list(bench_common.LORA_TARGETS),
                            gradient_checkpointing=mode)
    model.train()
    assert nbtune_peer.assert_checkpointing(model) == 3
    ids = torch.randint(0, 97, (2, 9))
    with nbtune_peer.CheckpointCallCounter(model) as counter:
        out = model(input_ids=ids, labels=ids)
    assert counter.calls == 3
    out.loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    # the counter is gone afterwards: the timed steps run the model's own checkpoint function
    assert all("counted" not in repr(layer._gradient_checkpointing_func)
               for layer in nbtune_peer.checkpointed_layers(model))
    model.eval()
    with pytest.raises(AssertionError, match="train mode"):
        nbtune_peer.assert_checkpointing(model)


def test_checkpointing_off_is_caught():
    import nbtune

    model = nbtune.add_lora(tiny_model(), r=4, alpha=4, targets=list(bench_common.LORA_TARGETS),
                            gradient_checkpointing="off")
    model.train()
    with pytest.raises(AssertionError, match="not enabled"):
        nbtune_peer.assert_checkpointing(model)
    with nbtune_peer.CheckpointCallCounter(model) as counter:
        model(input_ids=torch.randint(0, 97, (1, 5)))
    assert counter.calls == 0


# ------------------------------------------------------------------------------------------------
# long contexts, OOM lines, SDPA switch
# ------------------------------------------------------------------------------------------------
def test_checkpoint_view_for_contexts_past_max_positions(tmp_path):
    ckpt = tmp_path / "llama3-8b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(model_type="llama", max_position_embeddings=8192)))
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"w")
    (ckpt / "tokenizer.json").write_text("{}")
    assert nbtune_peer.checkpoint_for_context(str(ckpt), 8192) == (str(ckpt), None)
    view, limit = nbtune_peer.checkpoint_for_context(str(ckpt), 49152)
    assert limit == 8192 and view.endswith("llama3-8b@ctx49152")
    assert json.loads(open(os.path.join(view, "config.json")).read())["max_position_embeddings"] == 49152
    assert os.path.islink(os.path.join(view, "model-00001-of-00002.safetensors"))
    assert open(os.path.join(view, "tokenizer.json")).read() == "{}"
    assert json.loads((ckpt / "config.json").read_text())["max_position_embeddings"] == 8192  # untouched
    assert nbtune_peer.checkpoint_for_context(str(ckpt), 49152) == (view, 8192)  # reused


def test_oom_becomes_a_line_and_other_errors_propagate(monkeypatch, capsys):
    for name in ("build_checkpoint", "ensure_tokenizer", "apply_mem_cap"):
        monkeypatch.setattr(nbtune_peer, name, lambda *a, **k: None)
    monkeypatch.setenv("MEM_CAP_GIB", "14.3")

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(nbtune_peer, "run", oom)
    nbtune_peer.main(["llama3-8b:1:40960:float16"])
    line = json.loads(capsys.readouterr().out.strip())
    assert line["error"] == "OOM" and line["seqlen"] == 40960 and line["cap_gib"] == 14.3
    assert line["peer"].startswith("nbtune-") and line["dtype"] == "float16"

    def triton_oom(*a, **k):
        raise RuntimeError("Triton Error [CUDA]: out of memory")

    monkeypatch.setattr(nbtune_peer, "run", triton_oom)
    nbtune_peer.main(["llama3-8b:1:49152:float16"])
    assert json.loads(capsys.readouterr().out.strip())["error"] == "OOM"

    def broken(*a, **k):
        raise AssertionError("gradient checkpointing is not active")

    monkeypatch.setattr(nbtune_peer, "run", broken)
    with pytest.raises(AssertionError):
        nbtune_peer.main(["llama3-8b:1:2048:float16"])


def test_sdpa_switch_sets_the_backends_and_counts_calls():
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import bench_common, torch\n"
        "assert bench_common.apply_sdpa_backend_from_env() == 'efficient'\n"
        "import torch.nn.functional as F\n"
        "assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()\n"
        "assert torch.backends.cuda.mem_efficient_sdp_enabled()\n"
        "torch.backends.cuda.enable_math_sdp(True)  # the CPU has only the math kernel; the count is tested here\n"
        "from torch.nn.functional import scaled_dot_product_attention as sdpa\n"
        "q = torch.randn(1, 2, 4, 8)\n"
        "sdpa(q, q, q); F.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
        "bench_common.apply_sdpa_backend_from_env()  # a second call neither re-wraps nor re-registers\n"
        "torch.backends.cuda.enable_math_sdp(True)\n"
        "F.scaled_dot_product_attention(q, q, q)\n"
    ) % PEERS_DIR
    env = dict(os.environ, NBTUNE_BENCH_SDPA="memory-efficient")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    reports = [l for l in r.stderr.splitlines() if l.startswith("# bench-sdpa ")]
    assert len(reports) == 1 and json.loads(reports[0][len("# bench-sdpa "):]) == {"backend": "efficient", "calls": 3}
    env["NBTUNE_BENCH_SDPA"] = "flashy"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "NBTUNE_BENCH_SDPA" in r.stderr

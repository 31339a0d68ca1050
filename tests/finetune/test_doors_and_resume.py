"""Real runs on a tiny Llama: the three doors give the same run; a real interrupt (SIGINT) saves a
checkpoint and ``--resume`` continues it onto the same loss curve; the model is loaded once and
reused; the trained adapter chats, saves and merges."""
import os
import signal

import pytest
import torch
import yaml

import nbtune
from nbtune.train import session
from nbtune.train.checkpoint import MARKER, complete_checkpoints, latest_checkpoint
from nbtune.ui.dashboard import Dashboard

from .conftest import run_cell, tiny_config, train_losses

pytestmark = pytest.mark.filterwarnings("ignore")


def sigint_at(step):
    """A metrics listener that interrupts the process (as the notebook's stop button does) at ``step``."""
    def listener(rec):
        if rec.get("event") == "train" and rec.get("step") == step and "loss" in rec:
            os.kill(os.getpid(), signal.SIGINT)
    return listener


def raise_at(step):
    def listener(rec):
        if rec.get("event") == "train" and rec.get("step") == step and "loss" in rec:
            raise KeyboardInterrupt
    return listener


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_data, ip):
    session.clear()
    root = tmp_path_factory.mktemp("doors")
    cfg = lambda name: tiny_config(tiny_model_dir, tiny_data, root / name)  # noqa: E731
    out = {"root": root, "cfg": cfg}
    live = Dashboard(display=False, min_interval=0)
    out["api"] = nbtune.finetune(cfg("api"), dashboard=live)
    out["model_id"] = id(session._SLOT["model"])
    out["handler_before"] = signal.getsignal(signal.SIGINT)
    out["part"] = nbtune.finetune(cfg("part"), dashboard=False, progress=False, listeners=[sigint_at(2)])
    out["handler_after"] = signal.getsignal(signal.SIGINT)
    ip.user_ns["part_cfg"] = cfg("part")
    out["resumed"] = run_cell(ip, "%finetune part_cfg --resume --no-dashboard --out resumed")
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg("cli")))
    from nbtune.ui.cli import main

    out["cli_rc"] = main(["finetune", str(path)])
    out["magic"] = run_cell(ip, "%%finetune --no-dashboard --out magic_run\n" + yaml.safe_dump(cfg("magic")))
    out["model_id_end"] = id(session._SLOT["model"])
    return out


def _log(path):
    from nbtune.train.metrics import read_log

    return read_log(path)


def test_magic_cli_and_python_api_give_the_same_run(runs):
    api = train_losses(runs["api"].metrics)
    assert list(api) == [1, 2, 3, 4]
    assert runs["cli_rc"] == 0
    cli = train_losses(_log(runs["root"] / "cli" / "metrics.jsonl"))
    magic = train_losses(runs["magic"].metrics)
    assert cli == pytest.approx(api, rel=1e-6) and magic == pytest.approx(api, rel=1e-6)
    configs = [yaml.safe_load((runs["root"] / d / "run.yaml").read_text()) for d in ("api", "cli", "magic")]
    for c in configs:
        c["output"].pop("dir")
    assert configs[0] == configs[1] == configs[2]
    for d in ("api", "cli", "magic"):
        assert (runs["root"] / d / "adapter" / "adapter_model.safetensors").is_file()


def test_interrupt_stops_after_the_step_and_saves_a_resumable_checkpoint(runs):
    part = runs["part"]
    assert part.interrupted and part.steps == 2
    ckpt = part.checkpoint
    assert ckpt == latest_checkpoint(runs["root"] / "part") or part.checkpoint.name == "checkpoint-2"
    assert ckpt.name == "checkpoint-2"
    for name in (MARKER, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".staging")]
    assert runs["handler_after"] is runs["handler_before"]  # the SIGINT handler is put back
    assert "interrupted at step 2" in part.summary()


def test_resume_continues_onto_the_uninterrupted_loss_curve(runs):
    resumed = runs["resumed"]
    assert not resumed.interrupted and resumed.resumed_from == 2 and resumed.steps == 4
    straight = train_losses(runs["api"].metrics)
    again = train_losses(_log(resumed.log_path))
    assert list(again) == [1, 2, 3, 4]  # one record per step: the log reads as one run
    assert again == pytest.approx(straight, rel=1e-5)
    lrs = lambda recs: [r["lr"] for r in recs if r.get("event") == "train" and "lr" in r]  # noqa: E731
    assert lrs(_log(resumed.log_path)) == pytest.approx(lrs(runs["api"].metrics))
    assert resumed.eval_loss_before == pytest.approx(runs["api"].eval_loss_before)
    assert resumed.eval_loss_after == pytest.approx(runs["api"].eval_loss_after, rel=1e-5)
    assert resumed.train_loss == pytest.approx(runs["api"].train_loss, rel=1e-5)


def test_the_model_is_loaded_once_and_reused(runs):
    assert runs["model_id"] == runs["model_id_end"]


def test_replay_of_the_log_equals_the_live_dashboard(runs):
    api = runs["api"]
    live = api.dashboard
    assert live.renders > 0
    assert Dashboard.replay(api.log_path).figure_dict()["data"] == live.figure_dict()["data"]


def test_after_training_chat_generate_save_and_merge(runs, tmp_path):
    api = runs["api"]  # its base has been reused since: the adapter comes back from disk
    reply = api.generate("What is 2+2?", max_new_tokens=4)
    assert isinstance(reply, str)
    chat = api.chat()
    chat("hi", max_new_tokens=3)
    chat("and?", max_new_tokens=3)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    saved = api.save_adapter(tmp_path / "adapter")
    assert (saved / "adapter_config.json").is_file()
    merged = api.save_merged(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(merged)
    assert m.dtype == torch.float16
    model, tok = api.live_model()
    ids = tok("What is 3+3?", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = m.float()(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)  # and the merged fp16 checkpoint matches


def test_keyboard_interrupt_mid_run_is_saved_too(runs):
    cfg = runs["cfg"]("raised")
    part = nbtune.finetune(cfg, dashboard=False, progress=False, listeners=[raise_at(3)])
    assert part.interrupted and part.checkpoint is not None and part.checkpoint.name == "checkpoint-3"
    resumed = nbtune.finetune(cfg, dashboard=False, progress=False, resume=True)
    assert train_losses(resumed.metrics) == pytest.approx(train_losses(runs["api"].metrics), rel=1e-5)


def test_half_written_checkpoints_are_never_resumed(runs):
    out = runs["root"] / "part"
    (out / "checkpoints" / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-99" / "trainer_state.json").write_text("{}")  # no marker: incomplete
    assert latest_checkpoint(out).name == "checkpoint-4" or latest_checkpoint(out).name == "checkpoint-2"
    assert "checkpoint-99" not in [p.name for p in complete_checkpoints(out)]


def test_a_real_kernel_interrupt_stops_after_the_step_and_saves(tiny_model_dir, tiny_data, tmp_path):
    """The notebook's stop button: jupyter_client interrupts a kernel running a fine-tune."""
    import queue

    from jupyter_client.manager import start_new_kernel

    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "kernel", max_steps=500, grad_accum=1)
    cfg["data"]["eval_split"] = None
    code = ("import warnings; warnings.simplefilter('ignore')\nimport nbtune\n"
            f"r = nbtune.finetune({cfg!r}, dashboard=False)\n"
            "print('RESULT', r.interrupted, r.steps, r.checkpoint.name)")
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        msg_id = kc.execute(code)
        text, sent, errors = "", False, []
        while True:
            try:
                msg = kc.get_iopub_msg(timeout=120)
            except queue.Empty:
                pytest.fail("the kernel went silent:\n" + text[-2000:])
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            if msg["msg_type"] == "stream":
                text += content["text"]
                if not sent and "step 2/500" in text:
                    km.interrupt_kernel()
                    sent = True
            elif msg["msg_type"] == "error":
                errors.append(f"{content['ename']}: {content['evalue']}")
            elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert sent and not errors, errors
    result_line = next(line for line in text.splitlines() if line.startswith("RESULT"))
    _, interrupted, steps, name = result_line.split()
    assert interrupted == "True" and 2 <= int(steps) < 500 and name == f"checkpoint-{steps}"
    assert latest_checkpoint(tmp_path / "kernel").name == name
    assert "stopping after this step" in text

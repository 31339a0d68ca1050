"""Bad training data (issue 8) is rejected with a message that names the file, the line or row and
the field, and nothing is lost (``world.check()``). Structural problems fail before the model
loads; problems only tokenizing reveals (every row too long or empty) fail before anything is
written. Rows dropped from a run that goes ahead are counted, with the reason."""
import json

import pytest

import nbtune
from nbtune.train import DataError

from .conftest import jsonl, one_line, rejected, run_cli

DATA_CASES = {
    "empty file": ("empty.jsonl", "", {}, ["empty.jsonl", "is empty"]),
    "only blank lines": ("blank.jsonl", "\n\n  \n", {}, ["blank.jsonl", "is empty"]),
    "malformed JSON on line 3": ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', {},
                                 ["bad.jsonl line 3", "malformed JSON"]),
    "malformed JSON array, line 2": ("arr.json", '[{"text": "a"},\n {"text": }]', {},
                                     ["arr.json line 2", "malformed JSON"]),
    "not UTF-8": ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {},
                  ["latin1.jsonl line 2", "not UTF-8", "byte 0xe9 at byte offset 28", "save the file as UTF-8",
                   "iconv -f latin1 -t utf-8 latin1.jsonl"]),
    "CSV not UTF-8": ("latin1.csv", "prompt,completion\nWhat is 2+2?,4\nCaf\u00e9?,a place for coffee\n".encode("latin-1"),
                      {}, ["latin1.csv line 3", "not UTF-8", "byte 0xe9 at byte offset 36", "save the file as UTF-8"]),
    "missing columns": ("cols.jsonl", jsonl([{"q": "x", "a": "y"}]), {},
                        ["cannot tell the format", "prompt, completion", "data.format", "data.columns"]),
    "missing column on row 2": ("qa.jsonl", jsonl([{"question": "q", "answer": "a"}, {"question": "q2"}]),
                                {"format": "qa"}, ["row 2", "missing column 'answer'"]),
    "column that is not text": ("num.jsonl", jsonl([{"prompt": "q", "completion": "a"},
                                                    {"prompt": 7, "completion": "b"}]),
                                {}, ["row 2", "column 'prompt' must be text", "int"]),
    "wrong chat role": ("roles.jsonl", jsonl([{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "wizard", "content": "a"}]}]), {},
                        ["row 1", "'wizard'", "allowed roles: system, user, assistant"]),
    "chat turn without content": ("turns.jsonl", jsonl([{"messages": [{"role": "user"},
                                                                      {"role": "assistant", "content": "a"}]}]), {},
                                  ["row 1", "turn 0 content must be text"]),
    "no assistant turn": ("user.jsonl", jsonl([{"messages": [{"role": "user", "content": "q"}]}]), {},
                          ["row 1", "no assistant turn"]),
    "row not an object": ("rows.jsonl", '{"text": "a"}\n[1, 2]\n', {}, ["rows.jsonl row 2", "expected an object"]),
    "JSON that is not a list": ("d.json", json.dumps({"text": "a"}), {}, ["d.json", "expected a JSON list"]),
    "unsupported file type": ("notes.txt", "hello\n", {}, ["notes.txt", "unsupported file type", ".jsonl"]),
    "column mapping to a missing column": ("map.jsonl", jsonl([{"q": "x", "a": "y"}]),
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


def test_data_source_that_is_a_folder(world):
    folder = world.root / "my-data"
    folder.mkdir()
    msg = rejected(world, world.config(data={"source": str(folder)}))
    assert "data.source" in msg and "is a folder" in msg and ".jsonl" in msg


def test_all_rows_too_long_says_how_many_and_why(world, capsys):
    rows = [{"prompt": "word " * 200, "completion": "a"}] * 3
    path = world.write("long.jsonl", jsonl(rows))
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


def test_all_rows_empty_after_filtering_says_how_many_and_why(world):
    rows = [{"prompt": "q1", "completion": ""}, {"prompt": "q2", "completion": "   "}]
    path = world.write("empty-replies.jsonl", jsonl(rows))
    msg = rejected(world, world.config(data={"source": str(path)}))
    assert "all 2 rows were dropped (2 empty assistant reply)" in msg and "check the data" in msg
    assert "max_seq_length" not in msg  # not the advice for empty rows
    text = world.write("empty-text.jsonl", jsonl([{"text": ""}, {"text": " \n"}]))
    msg = rejected(world, world.config(data={"source": str(text)}))
    assert "all 2 rows were dropped (2 empty text)" in msg


def test_an_unknown_data_name_suggests_the_embedded_one(world):
    msg = rejected(world, world.config(data={"source": "gsm9k"}))
    assert "data.source 'gsm9k'" in msg and "did you mean 'gsm8k'" in msg


def test_one_line_per_cli_error_for_bad_data(world, capsys):
    path = world.write("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    code, err = run_cli(world, world.config(data={"source": str(path)}), capsys=capsys)
    line = one_line(err)
    assert code == 2 and "bad.jsonl line 2" in line and "malformed JSON" in line
    world.check()


# ----------------------------------------------------------------------------- splits of a local file
@pytest.mark.parametrize("data_cfg, needles", [
    ({"split": "validation"}, ["data.split: 'validation' names a split", "is a local file, which has one split (train)",
                               "leave data.split out", "data.eval_split"]),
    ({"eval_split": "test"}, ["data.eval_split: 'test' names a split", "one split (train)",
                              "measured on the training rows", "data.eval_split: auto", "a fraction", "null"]),
    ({"eval_split": "train"}, ["data.eval_split: 'train' names a split"]),
], ids=["split validation", "eval_split test", "eval_split train"])
def test_a_split_name_on_a_local_file_is_an_error(world, monkeypatch, data_cfg, needles, capsys):
    """A local file has one split: a split name used to read the whole file again, so the held-out
    loss was measured on the training rows without a word."""
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = world.config(data=data_cfg)
    msg = rejected(world, cfg)
    assert str(world.data) in msg
    for needle in needles:
        assert needle in msg, msg
    with pytest.raises(DataError, match="names a split"):
        nbtune.finetune(cfg, dry_run=True)
    code, err = run_cli(world, cfg, "--dry-run", capsys=capsys)
    assert code == 2 and "names a split" in one_line(err)
    world.check()


def test_eval_split_auto_holds_out_5_percent_of_a_local_file_and_says_so(world, tmp_path, capsys):
    """The own file of 12 rows: 'auto' holds out 1 (5%, at least 1), in the dry run's report and in
    one line of the run; the run measures the held-out loss on it."""
    report = nbtune.finetune(world.config(data={"eval_split": "auto"}), dry_run=True)
    assert (report.train_rows, report.eval_rows) == (11, 1)
    note = f"data.eval_split auto: 1 of the 12 rows of {world.data} held out for the held-out loss"
    assert f"  note: {note}" in report.summary()
    out = tmp_path / "auto-eval"
    capsys.readouterr()
    result = nbtune.finetune(world.config(data={"eval_split": "auto"}, output={"dir": str(out)}), dashboard=False,
                             progress=False, reuse_model=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "data.eval_split auto" in line]
    assert notes == [f"nbtune: {note} (5%, at least 1; data.eval_split: null trains on every row)"]
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    big = world.write("big.jsonl", jsonl([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)]))
    report = nbtune.finetune(world.config(data={"source": str(big), "eval_split": "auto"}), dry_run=True)
    assert (report.train_rows, report.eval_rows) == (95, 5)
    none = nbtune.finetune(world.config(data={"eval_split": None}), dry_run=True)
    assert none.eval_rows == 0 and not none.notes


# ----------------------------------------------------------------------------- a step larger than the data
def test_a_batch_larger_than_the_data_is_said_in_one_line(world, capsys):
    """batch_size x grad_accum above the training rows: one line says what a step really holds (all
    the rows, once), in the dry run and in the run, and the run does what it says."""
    report = nbtune.finetune(world.config(train={"batch_size": 1_000_000, "grad_accum": 4}), dry_run=True)
    note = ("train.batch_size x grad_accum = 4,000,000 rows per step, but the data has 12 training rows: each step "
            "trains on all 12 rows once (one epoch per step, 1 micro-batch of up to 12 rows instead of 4)")
    assert any(n.startswith(note) for n in report.notes), report.notes
    assert "= 2.00 epochs" in report.summary() and "lower train.batch_size" in report.summary()

    model, tok = nbtune.load_model(str(world.model_dir), max_seq_length=64)
    rows_seen = []
    hook = model.model.layers[0].register_forward_hook(
        lambda m, args, out: rows_seen.append(args[0].shape[0]) if m.training else None)
    capsys.readouterr()
    cfg = world.config(train={"batch_size": 5, "grad_accum": 4}, output={"dir": str(world.root / "big-batch")})
    result = nbtune.finetune(cfg, model=model, tokenizer=tok, dashboard=False, progress=False)
    hook.remove()
    lines = [line for line in capsys.readouterr().err.splitlines() if "rows per step" in line]
    assert lines == ["nbtune: train.batch_size x grad_accum = 20 rows per step, but the data has 12 training rows: "
                     "each step trains on all 12 rows once (one epoch per step, 3 micro-batches of up to 5 rows "
                     "instead of 4); lower train.batch_size / train.grad_accum for more steps per epoch"], lines
    assert result.steps == 2 and rows_seen == [5, 5, 2, 5, 5, 2]  # what the line said: 3 micro-batches, all rows
    fits = nbtune.finetune(world.config(train={"batch_size": 3, "grad_accum": 4}), dry_run=True)
    assert not fits.notes

"""The Ollama Modelfile: it parses, and its TEMPLATE (with its SYSTEM) renders the same prompts as
the tokenizer's chat template; a template with no known Ollama form is said to be untranslated."""
import pytest

from nbtune.export.modelfile import read_modelfile, render_go_template, write_modelfile

LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}"
           "{{ m['content'] }}</s>{% endif %}{% endfor %}")

CHATS = [
    [{"role": "user", "content": "Tom has 3 apples and buys 2 more. How many?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "What is 7*6?\nShow work."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "One"},
     {"role": "assistant", "content": "Un"}, {"role": "user", "content": "Two"}],
]


@pytest.fixture
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _check(tokenizer, tmp_path, chats):
    path = write_modelfile(tmp_path / "model-q8_0.gguf", tokenizer, eot="<|im_end|>")
    mf = read_modelfile(path)
    assert mf["FROM"] == "./model-q8_0.gguf"
    for chat in chats:
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert render_go_template(mf["TEMPLATE"], chat, mf.get("SYSTEM")) == want, chat
    return mf


def test_chatml_with_a_default_system_prompt(tokenizer, tmp_path):
    """SmolLM2's template: ChatML, with a default system message when the chat has none; Ollama
    gets it as SYSTEM and puts it first in such chats."""
    mf = _check(tokenizer, tmp_path, CHATS)
    assert mf["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ("stop", "<|im_end|>") in mf["PARAMETER"]
    assert mf["TEMPLATE"].startswith("{{- range .Messages }}<|im_start|>")


def test_llama3_and_gemma_formats(tokenizer, tmp_path):
    tokenizer.chat_template = LLAMA3
    mf = _check(tokenizer, tmp_path, CHATS)
    assert "SYSTEM" not in mf and "<|start_header_id|>" in mf["TEMPLATE"]
    tokenizer.chat_template = GEMMA  # no system role: chats without one
    mf = _check(tokenizer, tmp_path, [c for c in CHATS if c[0]["role"] != "system"])
    assert "<start_of_turn>" in mf["TEMPLATE"]


def test_untranslatable_template_is_said(tokenizer, tmp_path):
    tokenizer.chat_template = MISTRAL
    with pytest.warns(UserWarning, match="could not be translated"):
        path = write_modelfile(tmp_path / "m.gguf", tokenizer, eot=None)
    mf = read_modelfile(path)
    assert "TEMPLATE" not in mf and "could not be translated" in path.read_text()
    assert mf["FROM"] == "./m.gguf"


def test_go_template_subset():
    t = '{{- range .Messages }}[{{ if eq .Role "user" }}U{{ else }}{{ .Role }}{{ end }}]  {{- .Content -}}  |{{ end }}'
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_go_template(t, msgs) == "[U]a|[assistant]b|"
    assert render_go_template(t, msgs, system="s") == "[system]s|[U]a|[assistant]b|"
    with pytest.raises(ValueError, match="outside the subset"):
        render_go_template("{{ template \"x\" }}", msgs)


def test_modelfile_reader_refuses_garbage(tmp_path):
    (tmp_path / "Modelfile").write_text('FROM ./x.gguf\nTEMPLATE """a\nb"""\nnonsense here\n')
    with pytest.raises(ValueError, match="line 4"):
        read_modelfile(tmp_path / "Modelfile")

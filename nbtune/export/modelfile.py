"""An Ollama ``Modelfile`` beside a GGUF file: FROM, TEMPLATE, SYSTEM, PARAMETER stop.

Ollama formats a chat with a Go text/template over ``.Messages`` (each with ``.Role`` and
``.Content``), not with the tokenizer's Jinja chat template, so the template must be translated.
nbtune knows the Go form of the common chat formats (ChatML, Llama 3, Gemma, Phi-3) and picks the
one that renders the same prompt as the tokenizer's own template on test conversations (with and
without a system message, one and two user turns), rendering the Go text with a small interpreter
of the subset used here. A default system prompt that the Jinja template inserts when the chat
has none (SmolLM2's "You are a helpful AI assistant...") becomes the Modelfile's SYSTEM, which
Ollama puts first in such chats. When no known form matches, the Modelfile says so in a comment
and has no TEMPLATE (Ollama would then use the GGUF's chat template with its own, approximate,
detection), and a warning says the same.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

FORMATS = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "llama3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": ('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
              "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"),
    "phi3": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
}
SENTINELS = {"system": "You answer in one word.", "user": "What is 2+3?", "assistant": "Five.",
             "user2": "And 4+4?"}


# ---------------------------------------------------------------------------- Go template subset
_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _tokens(text: str):
    """Split a Go template into text and actions, applying the ``{{-`` / ``-}}`` whitespace trims."""
    out, pos = [], 0
    for m in _ACTION.finditer(text):
        literal = text[pos:m.start()]
        if m.group(1):
            literal = literal.rstrip()
        if out and out[-1][0] == "trim_next":
            out.pop()
            literal = literal.lstrip()
        out.append(("text", literal))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    tail = text[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        tail = tail.lstrip()
    out.append(("text", tail))
    return [t for t in out if t[0] != "text" or t[1]]


def _parse(tokens, i=0, stop=("end",)):
    """Nodes until an action in ``stop``; returns (nodes, index of the stopping action)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split()[0] if value else ""
        if word in stop:
            return nodes, i
        if word == "range":
            body, j = _parse(tokens, i + 1)
            nodes.append(("range", value.split()[1], body))
            i = j + 1
        elif word == "if":
            then, j = _parse(tokens, i + 1, stop=("end", "else"))
            other = []
            if tokens[j][1].split()[0] == "else":
                other, j = _parse(tokens, j + 1)
            nodes.append(("if", value[2:].strip(), then, other))
            i = j + 1
        elif value.startswith("."):
            nodes.append(("field", value))
            i += 1
        else:
            raise ValueError(f"Go template action {{{{ {value} }}}} is outside the subset nbtune renders")
    if stop != ("end",) or i < len(tokens):
        raise ValueError("unterminated Go template block")
    return nodes, i


def _value(expr: str, scope: dict):
    expr = expr.strip()
    m = re.fullmatch(r'eq\s+(\.\w+)\s+"([^"]*)"', expr)
    if m:
        return _value(m.group(1), scope) == m.group(2)
    if re.fullmatch(r"\.\w+", expr):
        return scope.get(expr[1:], "")
    raise ValueError(f"Go template expression {expr!r} is outside the subset nbtune renders")


def _render(nodes, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_value(node[1], scope)))
        elif node[0] == "if":
            out.append(_render(node[2] if _value(node[1], scope) else node[3], scope))
        elif node[0] == "range":
            for item in _value(node[1], scope) or []:
                out.append(_render(node[2], {**scope, **item}))
    return "".join(out)


def render_go_template(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render an Ollama template (the subset nbtune writes: range, if/else, eq, fields) as Ollama
    would for ``messages``: a Modelfile SYSTEM goes first when the chat has no system message."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    nodes, _ = _parse(_tokens(template))
    roles = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return _render(nodes, {"Messages": roles, "System": system or "", "Prompt": ""})


# ---------------------------------------------------------------------------- translation
def _conversations(with_system: bool):
    s, u, a, u2 = (SENTINELS[k] for k in ("system", "user", "assistant", "user2"))
    convs = [[{"role": "user", "content": u}],
             [{"role": "user", "content": u}, {"role": "assistant", "content": a}, {"role": "user", "content": u2}]]
    if with_system:
        convs += [[{"role": "system", "content": s}, *c] for c in convs]
    return convs


def _hf_render(tokenizer, messages) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    # the runtime adds BOS itself when the tokenizer does; a template that spells it must not add a second
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None


def translate_chat_template(tokenizer) -> tuple[str | None, str | None, str]:
    """(Go template, default system prompt or None, the format's name) for the tokenizer's chat
    template, or (None, None, why) when no known format renders the same prompts."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None, "the tokenizer has no chat template"
    try:
        _hf_render(tokenizer, _conversations(True)[2])
        with_system = True
    except Exception:  # templates without a system role (Gemma 1/2) raise on one
        with_system = False
    for name, template in FORMATS.items():
        default = _default_system(tokenizer, template)
        if all(_hf_render(tokenizer, conv) == render_go_template(template, conv, default)
               for conv in _conversations(with_system)):
            return template, default, name
    return None, None, ("its chat template renders prompts that none of the known formats (" + ", ".join(FORMATS)
                        + ") reproduces")


def _default_system(tokenizer, template: str) -> str | None:
    """The system prompt the Jinja template inserts when a chat has none (found by rendering one
    user turn and matching it against this Go template's system block), or None."""
    conv = _conversations(False)[0]
    hf = _hf_render(tokenizer, conv)
    if hf == render_go_template(template, conv):
        return None
    marker = "\x00NBTUNE\x00"
    pre, _, post = render_go_template(template, conv, marker).partition(marker)
    if hf.startswith(pre) and hf.endswith(post) and len(hf) > len(pre) + len(post):
        return hf[len(pre): len(hf) - len(post)]
    return None


def write_modelfile(gguf_path, tokenizer, eot: str | None = None, system_prompt: str | None = None) -> Path:
    """``Modelfile`` beside ``gguf_path`` (``ollama create NAME -f Modelfile`` in that folder)."""
    gguf_path = Path(gguf_path)
    template, default_system, why = translate_chat_template(tokenizer)
    lines = [f"# Ollama: cd to this folder, then `ollama create <name> -f {gguf_path.stem}.Modelfile`",
             f"FROM ./{gguf_path.name}"]
    if template is None:
        note = (f"the tokenizer's chat template could not be translated to an Ollama TEMPLATE ({why}); Ollama will "
                "use the chat template stored in the GGUF file as best it can")
        lines.append(f"# NOTE: {note}")
        warnings.warn(f"nbtune: {note}", UserWarning, stacklevel=3)
    else:
        lines.append(f"# TEMPLATE: the {why} chat format, checked against the tokenizer's chat template")
        lines.append(f'TEMPLATE """{template}"""')
    system = system_prompt or default_system
    if system:
        if '"""' in system:
            raise ValueError('the system prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    stops = [t for t in dict.fromkeys([eot, tokenizer.eos_token]) if t]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_modelfile(path) -> dict:
    """A Modelfile's instructions: {"FROM": str, "TEMPLATE": str, "SYSTEM": str, "PARAMETER": [(k, v)]};
    fails on a line that is not one (``\"\"\"`` quotes may span lines)."""
    text = Path(path).read_text(encoding="utf-8")
    out: dict = {"PARAMETER": []}
    pos = 0
    instruction = re.compile(r'[ \t]*(#[^\n]*|(FROM|TEMPLATE|SYSTEM|PARAMETER|ADAPTER|LICENSE|MESSAGE)[ \t]+'
                             r'("""(.*?)"""|[^\n]*))?[ \t]*(\n|$)', re.S | re.I)
    while pos < len(text):
        m = instruction.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"Modelfile line {text.count(chr(10), 0, pos) + 1} is not an instruction: "
                             f"{text[pos:].splitlines()[0]!r}")
        pos = m.end()
        if not m.group(2):
            continue
        key = m.group(2).upper()
        value = m.group(4) if m.group(4) is not None else m.group(3).strip()
        if key == "PARAMETER":
            name, _, arg = value.partition(" ")
            out["PARAMETER"].append((name, arg.strip().strip('"')))
        else:
            out[key] = value
    return out

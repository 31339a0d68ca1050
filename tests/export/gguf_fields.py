"""The value of a field of a GGUF file that ``gguf.GGUFReader`` read, what gguf's
``ReaderField.contents()`` gives: a string, a number, or a list of them. gguf 0.13 (the floor of
pyproject.toml) has no ``contents()``; its fields hold the same ``parts`` / ``data`` / ``types``,
which this decodes, so the export tests read a file the same way on every supported gguf."""
from __future__ import annotations


def field_value(field):
    """``field``'s value: the UTF-8 text of a string, the item of a scalar, the list of an array's
    items (strings or numbers); None for a field without a type."""
    from gguf import GGUFValueType

    def text(part) -> str:
        return str(part.tobytes(), encoding="utf-8")

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if field.types[0] == GGUFValueType.STRING:
        return text(field.parts[-1])
    return field.parts[-1].tolist()[0]

"""Column mapping for any other schema: name the prompt, response and (optional) system columns.

    prompt_field: question, response_field: answer, system_field: persona     (YAML, or the flags)
    columns: "prompt=question,response=answer,system=persona"                 (one option)

Mapped rows become chat rows (system / user / assistant messages), so they are rendered by the
chat format (the tokenizer's template, or a named one) and only the response is learned.
"""

from __future__ import annotations

from ..errors import QloraError
from .load import Rows, type_name, where

ROLES = {"prompt": "user", "response": "assistant", "system": "system"}


def column_map(prompt_field: str | None, response_field: str | None, system_field: str | None,
               columns: str | None) -> dict[str, str] | None:
    """{'prompt': col, 'response': col, ['system': col]} from the fields or the `columns` string; None if unset."""
    mapping = {k: v for k, v in (("prompt", prompt_field), ("response", response_field), ("system", system_field)) if v}
    if columns:
        for item in filter(None, (s.strip() for s in columns.split(","))):
            key, sep, col = (s.strip() for s in item.partition("="))
            if not sep or key not in ROLES or not col:
                raise QloraError(f"columns: cannot read {item!r}; write prompt=COL,response=COL[,system=COL]")
            if key in mapping and mapping[key] != col:
                raise QloraError(f"columns: {key} is mapped twice ({mapping[key]!r} and {col!r})")
            mapping[key] = col
    if not mapping:
        return None
    missing = [k for k in ("prompt", "response") if k not in mapping]
    if missing:
        raise QloraError(f"columns: a mapping needs both prompt and response columns; {' and '.join(missing)} "
                         f"not given (set {missing[0]}_field or columns={missing[0]}=COL)")
    return mapping


def map_rows(rows: list[dict], mapping: dict[str, str], source: str) -> Rows:
    """Rows as {'messages': [...]}: system (when mapped and non-empty), user prompt, assistant response."""
    mapped = []
    for i, row in enumerate(rows):
        messages = []
        for key in ("system", "prompt", "response"):
            col = mapping.get(key)
            if col is None:
                continue
            if col not in row:
                found = ", ".join(sorted(row)) or "none"
                raise QloraError(f"{where(rows, i, source)}: missing column '{col}' "
                                 f"(the {key} column; keys found: {found})")
            value = row[col]
            if key == "system" and value is None:
                continue
            if not isinstance(value, str):
                raise QloraError(f"{where(rows, i, source)}: column '{col}' ({key}) must be a string, "
                                 f"got {type_name(value)}")
            if key != "system" or value:
                messages.append({"role": ROLES[key], "content": value})
        mapped.append({"messages": messages})
    return Rows(mapped, getattr(rows, "source", source), getattr(rows, "lines", None))

"""Record formats: detection from a source's first rows, and conversion to canonical messages.

Supported input formats (fields other than these are ignored):

- ``alpaca``: ``instruction`` and ``output`` (required), ``input`` and ``system`` (optional).
  The user message is the instruction, followed by a blank line and the input when there is one
  (an empty instruction leaves the input alone).
- ``sharegpt``: ``conversations``, a list of ``{"from": ..., "value": ...}``; ``from`` is
  ``human``/``user``, ``gpt``/``assistant`` or ``system``.
- ``messages`` (OpenAI style): ``messages``, a list of ``{"role": ..., "content": ...}`` with role
  ``system``, ``user`` or ``assistant`` and string content.
- ``prompt_completion``: ``prompt`` -> one user message, ``completion`` -> one assistant message.
- ``text``: a plain document in ``text``. It becomes an empty user message followed by one assistant
  message holding the whole text: every record then has the same shape (optional system, then
  user/assistant pairs), which every chat template accepts, and with ``tokenize.train_on``
  'assistant' the loss covers the entire text. The empty user message is the one place an empty
  content is allowed; later stages must let it through.
- ``prompt_chosen_rejected``, ``instruction_chosen_rejected``, ``sharegpt_chosen_rejected`` and
  ``chosen_rejected``: preference pairs (train.objective dpo or simpo), read by leantune/data/preference.py; with train.objective=sft such a row is rejected
  (``preference_pair``).

Every content is normalised (`normalize_text`); one with nothing visible left (only spaces, invisible
format characters such as a zero-width space, lone combining marks, or fillers such as U+3164; see
`normalize.is_blank`) is empty. A conversation must be: an optional leading system
message, then user and assistant alternating, starting with user and ending with assistant.
A row that breaks a rule raises `RowError` with a short stable code and a detail.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from leantune.data.normalize import has_lone_surrogate, is_blank, normalize_text

# Preference pairs (train.objective dpo or simpo), read by leantune/data/preference.py.
PAIR_FORMATS = ("prompt_chosen_rejected", "instruction_chosen_rejected", "sharegpt_chosen_rejected", "chosen_rejected")
FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", *PAIR_FORMATS)

# The fields that identify each format, tried in this order: the more specific first, so that an
# alpaca row that also carries a 'text' column counts as alpaca.
_SIGNATURES = {
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "instruction_chosen_rejected": ("instruction", "chosen", "rejected"),
    "sharegpt_chosen_rejected": ("conversations", "chosen", "rejected"),
    "chosen_rejected": ("chosen", "rejected"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_MESSAGE_ROLES = ("system", "user", "assistant")


class RowError(Exception):
    """A row that cannot become a record: `code` is a short stable reason, `detail` says more."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def row_format(row: dict) -> str | None:
    """The first format whose identifying fields are all present in `row`, or None."""
    return next((fmt for fmt, keys in _SIGNATURES.items() if all(k in row for k in keys)), None)


def detect_format(rows: list[Any]) -> str | None:
    """The format most of `rows` (the objects among them) match; ties go to the more specific one."""
    votes = Counter(fmt for row in rows if isinstance(row, dict) if (fmt := row_format(row)))
    if not votes:
        return None
    order = list(_SIGNATURES)
    return max(votes, key=lambda fmt: (votes[fmt], -order.index(fmt)))


def to_messages(row: Any, fmt: str) -> list[dict]:
    """Convert one parsed row of format `fmt` into normalised, checked canonical messages."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type_name(row)}")
    if fmt in PAIR_FORMATS:
        raise RowError("preference_pair", "a chosen/rejected preference pair, which train.objective=sft does not "
                                          "train on; set train.objective=dpo or simpo")
    if fmt == "alpaca":
        # Either part may be empty: the blank line only goes between two parts that say something.
        parts = (_text(row, "instruction"), _text(row, "input", required=False))
        user = "\n\n".join(part for part in parts if part)
        messages = _with_system(row, [("user", user), ("assistant", _text(row, "output"))])
    elif fmt == "prompt_completion":
        messages = [("user", _text(row, "prompt")), ("assistant", _text(row, "completion"))]
    elif fmt == "text":
        messages = [("user", ""), ("assistant", _text(row, "text"))]
    elif fmt == "sharegpt":
        messages = _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
    elif fmt == "messages":
        messages = _turns(row, "messages", "role", "content", {r: r for r in _MESSAGE_ROLES})
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    _check_order([role for role, _ in messages])
    # The empty user prompt of a 'text' record is by design; every other content must say something.
    for i, (role, content) in enumerate(messages):
        if is_blank(content) and not (fmt == "text" and i == 0):
            raise RowError("empty_content", f"message {i} ({role}) is empty after normalisation")
    return [{"role": role, "content": content} for role, content in messages]


def _text(obj: dict, key: str, required: bool = True) -> str:
    """The normalised string at `obj[key]`; a missing or null optional field is ''."""
    value = obj.get(key)
    if value is None:
        if required:
            raise RowError("missing_field", f"'{key}' is missing" if key not in obj else f"'{key}' is null")
        return ""
    if not isinstance(value, str):
        raise RowError("non_text_value", f"'{key}' is {type_name(value)}, expected a string")
    if has_lone_surrogate(value):
        raise RowError("invalid_unicode", f"'{key}' holds a lone UTF-16 surrogate, not valid text")
    return normalize_text(value)


def _with_system(row: dict, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    system = _text(row, "system", required=False)
    return [("system", system), *messages] if system else messages


def _turns(row: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[tuple[str, str]]:
    turns = row.get(key)
    if turns is None:
        raise RowError("missing_field", f"'{key}' is missing" if key not in row else f"'{key}' is null")
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else type_name(turns)
        raise RowError("bad_structure", f"'{key}' must be a non-empty list, got {got}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("bad_structure", f"{key}[{i}] is {type_name(turn)}, expected an object")
        raw_role = turn.get(role_key)
        if raw_role is None:
            raise RowError("missing_field", f"{key}[{i}] has no '{role_key}'")
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError("unknown_role", f"{key}[{i}].{role_key} is {raw_role!r}; expected one of "
                                           f"{sorted(roles)}")
        try:
            out.append((role, _text(turn, content_key)))
        except RowError as e:
            raise RowError(e.code, f"{key}[{i}]: {e.detail}") from None
    return out


def _check_order(roles: list[str]) -> None:
    """Optional leading system, then user/assistant alternating, starting with user, ending with assistant."""
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[: len(body)] or body[-1] != "assistant":
        raise RowError("wrong_role_order", f"roles are {roles}; expected an optional system message, then "
                                           "user/assistant alternating, ending with assistant")


def type_name(value: Any) -> str:
    """How a value's type reads in a reject detail (JSON terms: an object, a list, null...)."""
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean", str: "a string",
            int: "a number", float: "a number", bytes: "bytes"}.get(type(value), type(value).__name__)

"""Format detection, conversion to canonical messages, normalisation, ids, and the compact id set."""

import hashlib
import json
from pathlib import Path

import pytest

from leantune.config import DataConfig, SourceConfig
from leantune.data.formats import RowError, detect_format, row_format, to_messages
from leantune.data.normalize import IdSet, normalize_text, record_id
from leantune.data.sources import iter_source

DATA = Path(__file__).parents[1] / "fixtures"


def rows_of(name: str):
    src = SourceConfig(path=str(DATA / name), name="t")
    return list(iter_source(src, DataConfig(sources=[src]), 0))


def convert_all(name: str, fmt: str | None = None):
    """[(line, messages or reason code)] for every row of a fixture file."""
    rows = rows_of(name)
    fmt = fmt or detect_format([r.value for r in rows if r.error is None])
    out = []
    for r in rows:
        try:
            if r.error:
                raise r.error
            out.append((r.line, to_messages(r.value, fmt)))
        except RowError as e:
            out.append((r.line, e.code))
    return out


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


@pytest.mark.parametrize("name, fmt", [
    ("alpaca.jsonl", "alpaca"), ("alpaca_bad.jsonl", "alpaca"), ("sharegpt.json", "sharegpt"),
    ("sharegpt_bad.jsonl", "sharegpt"), ("messages.jsonl", "messages"), ("messages_bad.jsonl", "messages"),
    ("prompt_completion.csv", "prompt_completion"), ("prompt_completion_bad.csv", "prompt_completion"),
    ("text.parquet", "text"), ("splits.json", "alpaca"), ("dir", "prompt_completion"), ("unknown.jsonl", None),
])
def test_detects_format_of_each_fixture(name, fmt):
    assert detect_format([r.value for r in rows_of(name) if r.error is None]) == fmt


def test_detection_prefers_the_majority_then_the_more_specific_format():
    # An alpaca row that also carries 'text' is alpaca, not text.
    assert row_format({"instruction": "i", "output": "o", "text": "t"}) == "alpaca"
    assert detect_format([{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}]) == "text"
    assert detect_format([{"text": "a"}, {"prompt": "p", "completion": "c"}]) == "prompt_completion"
    assert detect_format([[1], "x", None]) is None


def test_alpaca_rows_convert_with_input_system_and_normalisation():
    assert convert_all("alpaca.jsonl") == [
        (1, [u("Name a primary colour."), a("Red.")]),
        (2, [u("Translate to French.\n\nGood morning"), a("Bonjour")]),
        (3, [s("You are terse."), u("Summarise.\n\nA long text."), a("Short.")]),
        # NFD "e" + combining acute -> NFC "é"; BEL and CRLF removed; spaces trimmed; tab kept.
        (5, [u("Caf\u00e9 menu"), a("Espresso\tand tea")]),
    ]


def test_sharegpt_roles_map_to_canonical_roles():
    assert convert_all("sharegpt.json") == [
        (1, [u("Hello"), a("Hi there")]),
        (2, [s("Be kind."), u("Q1"), a("A1"), u("Q2"), a("A2")]),
        (3, [u("Ping"), a("Pong")]),
    ]


def test_messages_rows_convert_unchanged():
    assert convert_all("messages.jsonl") == [
        (1, [u("What is the capital of Spain?"), a("Madrid.")]),
        (2, [s("Answer briefly."), u("2+2?"), a("4"), u("3+3?"), a("6")]),
        (3, [u("Thanks"), a("You're welcome.")]),
    ]


def test_prompt_completion_csv_converts_with_multiline_field():
    assert convert_all("prompt_completion.csv") == [
        (2, [u("What is 2+2?"), a("4")]),
        (3, [u("Write two lines"), a("first\nsecond")]),
        (5, [u("Capital of Italy?"), a("Rome")]),
    ]


def test_text_becomes_empty_user_then_assistant_text():
    assert convert_all("text.parquet") == [
        (1, [u(""), a("First document.")]),
        (2, [u(""), a("Second document.")]),
        (3, "missing_field"),
        (4, "empty_content"),
    ]


@pytest.mark.parametrize("name, expected", [
    ("alpaca_bad.jsonl", [(2, "bad_json"), (3, "not_an_object"), (4, "missing_field"), (5, "empty_content"),
                          (6, "non_text_value"), (7, "undecodable_bytes"), (8, "invalid_unicode")]),
    ("sharegpt_bad.jsonl", [(2, "wrong_role_order"), (3, "wrong_role_order"), (4, "unknown_role"),
                            (5, "bad_structure"), (6, "missing_field"), (7, "wrong_role_order")]),
    ("messages_bad.jsonl", [(2, "non_text_value"), (3, "unknown_role"), (4, "wrong_role_order"),
                            (5, "empty_content"), (6, "not_an_object"), (7, "bad_structure")]),
    ("prompt_completion_bad.csv", [(3, "empty_content"), (4, "bad_csv_row"), (5, "undecodable_bytes")]),
])
def test_malformed_rows_get_their_reason_and_line(name, expected):
    results = convert_all(name)
    assert [(line, r) for line, r in results if isinstance(r, str)] == expected
    # The valid rows around the bad ones still convert.
    assert len([r for _, r in results if isinstance(r, list)]) == len(results) - len(expected)


@pytest.mark.parametrize("roles", [
    ["user"], ["assistant"], ["system"], ["assistant", "user"], ["user", "assistant", "user"],
    ["user", "user", "assistant"], ["system", "system", "user", "assistant"], ["user", "assistant", "assistant"],
    ["user", "system", "assistant"],
])
def test_wrong_role_orders_are_rejected(roles):
    row = {"messages": [{"role": r, "content": "x"} for r in roles]}
    with pytest.raises(RowError) as e:
        to_messages(row, "messages")
    assert e.value.code == "wrong_role_order"


@pytest.mark.parametrize("roles", [["user", "assistant"], ["system", "user", "assistant"],
                                   ["user", "assistant", "user", "assistant"]])
def test_valid_role_orders_pass(roles):
    row = {"messages": [{"role": r, "content": "x"} for r in roles]}
    assert [m["role"] for m in to_messages(row, "messages")] == roles


@pytest.mark.parametrize("row, fmt, code", [
    ({"instruction": "i", "output": None}, "alpaca", "missing_field"),
    ({"instruction": "i", "output": "o", "system": 5}, "alpaca", "non_text_value"),
    ({"prompt": "p", "completion": ["c"]}, "prompt_completion", "non_text_value"),
    ({"text": True}, "text", "non_text_value"),
    ({"text": "\x00\x01\n\t "}, "text", "empty_content"),
    ({"conversations": [{"from": 1, "value": "x"}]}, "sharegpt", "unknown_role"),
    ({"conversations": [{"value": "x"}]}, "sharegpt", "missing_field"),
    ({"conversations": ["human: hi"]}, "sharegpt", "bad_structure"),
    ({"messages": None}, "messages", "missing_field"),
    ({"prompt": "p", "completion": "c"}, "text", "missing_field"),  # a forced format that does not fit
])
def test_row_errors(row, fmt, code):
    with pytest.raises(RowError) as e:
        to_messages(row, fmt)
    assert e.value.code == code


def test_alpaca_null_input_is_no_input():
    assert to_messages({"instruction": "i", "input": None, "output": "o"}, "alpaca") == [u("i"), a("o")]


def test_normalize_text():
    assert normalize_text("  e\u0301\r\nline\rnext\x00\x1b[0m\x7f\x85 \t") == "\u00e9\nline\nnext[0m"
    assert normalize_text("keep\ttab\nand newline") == "keep\ttab\nand newline"
    assert normalize_text("\u200bzero-width space is not a control character") == \
        "\u200bzero-width space is not a control character"


def test_record_id_is_sha256_of_canonical_json_16_hex():
    messages = [u("Hi"), a("Hello")]
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    assert record_id(messages) == hashlib.sha256(blob).hexdigest()[:16]
    # Pinned: ids must not change between versions, or resumed runs would see other records.
    assert record_id(messages) == "d6a46ee39fedca62"
    assert record_id([a("Hello"), u("Hi")]) != record_id(messages)


def test_id_set_membership_across_merges():
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(5000)]
    seen = IdSet(merge_at=100)
    for i in ids[:3000]:
        assert i not in seen
        seen.add(i)
    assert len(seen) == 3000
    assert all(i in seen for i in ids[:3000])
    assert not any(i in seen for i in ids[3000:])
    assert "0000000000000000" not in seen and "ffffffffffffffff" not in seen

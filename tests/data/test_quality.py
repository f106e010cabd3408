"""Quality metrics on a small fixture whose numbers are computed by hand below."""

import json

import numpy as np
import pytest

from leantune.data.quality import length_summary, quality_report


def msgs(*role_content):
    return [{"role": r, "content": c} for r, c in role_content]


TRAIN = [
    # conversation chars 8, 2 turns, assistant turn 5
    {"id": "r1", "source": "a", "messages": msgs(("user", "abc"), ("assistant", "hello"))},
    # 14 chars, 3 turns, assistant turn 10
    {"id": "r2", "source": "a", "messages": msgs(("system", "sys"), ("user", "q"), ("assistant", "0123456789"))},
    # 10 chars, 4 turns, assistant turns 1 and 3
    {"id": "r3", "source": "b", "messages": msgs(("user", "ab"), ("assistant", "a"), ("user", "abcd"),
                                                 ("assistant", "xyz"))},
]
# 7 chars, 2 turns, assistant turn 6
VAL = [{"id": "r4", "source": "a", "messages": msgs(("user", "u"), ("assistant", "answer"))}]

PREPARE = {
    "sources": {
        "a": {"format": "alpaca", "read": 8, "kept": 4, "rejected": 2, "duplicates": 1, "not_selected": 1,
              "reasons": {"bad_json": 1, "empty_output": 1}},
        "b": {"format": "sharegpt", "read": 3, "kept": 2, "rejected": 1, "duplicates": 0, "not_selected": 0,
              "reasons": {"no_assistant": 1}},
        "c": {"format": "alpaca", "read": 1, "kept": 0, "rejected": 1, "duplicates": 0, "not_selected": 0,
              "reasons": {"bad_json": 1}},
    },
    "totals": {"read": 12, "kept": 6, "rejected": 4, "duplicates": 1, "not_selected": 1,
               "reasons": {"bad_json": 2, "empty_output": 1, "no_assistant": 1}},
}
VALIDATION = {
    "records": 6, "train": 3, "val": 1, "quarantined": 2,
    "expectations": [{"name": "id_unique", "rows_failed": 0}, {"name": "roles_alternate", "rows_failed": 1},
                     {"name": "ends_with_assistant", "rows_failed": 2}],
    "per_source": {"a": {"records": 4, "train": 2, "val": 1, "quarantined": 1},
                   "b": {"records": 2, "train": 1, "val": 0, "quarantined": 1}},
}


@pytest.fixture
def data_dir(tmp_path):
    for name, records in (("train.jsonl", TRAIN), ("val.jsonl", VAL)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_quality_report_numbers(data_dir):
    report = quality_report(PREPARE, VALIDATION, data_dir)
    assert json.loads((data_dir / "quality.json").read_text()) == report

    assert report["totals"] == {"read": 12, "kept": 6, "rejected": 4, "duplicates": 1, "not_selected": 1,
                                "validated": 6, "train": 3, "val": 1, "quarantined": 2}
    assert report["rates"] == {"reject": 4 / 12, "duplicate": 1 / 12, "quarantine": 2 / 6}
    assert report["reject_reasons"] == {"bad_json": 2, "empty_output": 1, "no_assistant": 1}
    assert list(report["quarantine_reasons"].items()) == [("ends_with_assistant", 2), ("roles_alternate", 1)]
    assert report["split"] == {"train": 3, "val": 1, "val_share": 0.25}

    assert report["sources"]["a"] == {"format": "alpaca", "read": 8, "kept": 4, "rejected": 2, "duplicates": 1,
                                      "not_selected": 1, "train": 2, "val": 1, "quarantined": 1,
                                      "reject_reasons": {"bad_json": 1, "empty_output": 1}}
    assert report["sources"]["c"]["train"] == 0
    assert report["formats"] == {
        "alpaca": {"read": 9, "kept": 4, "rejected": 3, "duplicates": 1, "not_selected": 1,
                   "train": 2, "val": 1, "quarantined": 1},
        "sharegpt": {"read": 3, "kept": 2, "rejected": 1, "duplicates": 0, "not_selected": 0,
                     "train": 1, "val": 0, "quarantined": 1},
    }

    # Conversations [8, 14, 10, 7] -> sorted [7, 8, 10, 14]; nearest rank: p50 = 2nd, p90 = p99 = 4th.
    assert report["conversation_chars"] == {"count": 4, "total": 39, "mean": 9.75, "p50": 8, "p90": 14,
                                            "p99": 14, "max": 14}
    # Assistant turns [5, 10, 1, 3, 6] -> sorted [1, 3, 5, 6, 10]; p50 = 3rd, p90 = 5th.
    assert report["assistant_turn_chars"] == {"count": 5, "total": 25, "mean": 5.0, "p50": 5, "p90": 10,
                                              "p99": 10, "max": 10}
    # Turns [2, 3, 4, 2] -> sorted [2, 2, 3, 4].
    assert report["turns"] == {"count": 4, "total": 11, "mean": 2.75, "p50": 2, "p90": 4, "p99": 4, "max": 4,
                               "histogram": {"2": 2, "3": 1, "4": 1}}


def test_length_summary_of_nothing_is_empty_not_an_error():
    assert length_summary(np.array([], dtype=np.int64)) == {
        "count": 0, "total": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}

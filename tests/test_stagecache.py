"""Stage cache: hits on the same inputs and settings, misses exactly where something relevant changed."""

import json
from pathlib import Path

import numpy as np
import pytest

from leantune.config import load_config
from leantune.data.prepare import prepare
from leantune.rundir import RunDir, create_run_dir, data_stages_done
from leantune.stagecache import run_cached
from leantune.tokenization import tokenize, tokenize_checked
from leantune.validation import validate_records

STAGES = ("prepare", "validate", "tokenize")
SMALL = ["tokenize.vocab_size=300", "tokenize.max_seq_len=128", "data.val_fraction=0.2", "data.chunk_size=16"]


def write_inputs(directory: Path) -> Path:
    """A directory source of two alpaca files, 30 records each."""
    directory.mkdir(parents=True)
    for part in (0, 1):
        rows = [{"instruction": f"Is {i} + {part} equal to {i + part + (i % 3 == 0)}?", "input": "",
                 "output": f"{'No' if i % 3 == 0 else 'Yes'}: {i} + {part} is {i + part}."} for i in range(30)]
        (directory / f"part-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def stage_config(inputs: Path, out: Path, name: str, *overrides: str):
    return load_config(overrides=[*SMALL, f"data.sources=[{{kind: file, path: '{inputs}', name: qa}}]",
                                  f"run.output_dir={out}", f"run.name={name}", *overrides])


def run_stages(inputs: Path, out: Path, name: str, *overrides: str) -> tuple[Path, dict, dict]:
    """The three data stages as the flow's tasks run them; returns (run dir, stats, which stages ran)."""
    cfg = stage_config(inputs, out, name, *overrides)
    run_dir = create_run_dir(cfg)
    ran, stats = {}, {}

    computes = {"prepare": lambda: prepare(cfg, run_dir / "data"),
                "validate": lambda: validate_records(cfg, run_dir / "data"),
                "tokenize": lambda: tokenize_checked(cfg, run_dir / "data", run_dir / "tokens")}
    for stage in STAGES:
        stats[stage], hit = run_cached(cfg, stage, run_dir, computes[stage])
        ran[stage] = hit is None
    return run_dir, stats, ran


def files(run_dir: Path) -> dict[str, bytes]:
    """Every output file of the data stages, by relative path (config.yaml names the run: left out)."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "config.yaml"}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("stagecache")
    inputs = write_inputs(root / "inputs")
    run_dir, stats, ran = run_stages(inputs, root / "runs", "first")
    assert ran == {"prepare": True, "validate": True, "tokenize": True}
    assert data_stages_done(run_dir)  # tokenize_checked ran the token suite: tokens/validation.json passed
    return root, inputs, run_dir, stats


def test_same_config_and_inputs_hit_every_stage_with_identical_outputs(first):
    root, inputs, first_dir, first_stats = first
    run_dir, stats, ran = run_stages(inputs, root / "runs", "second")
    assert ran == {"prepare": False, "validate": False, "tokenize": False}
    assert files(run_dir) == files(first_dir)
    assert len(files(run_dir)) >= 12  # records, rejects, splits, reports, tokenizer, shards
    assert stats["prepare"] == first_stats["prepare"]
    assert stats["prepare"]["totals"]["read"] == 60
    assert stats["validate"] == first_stats["validate"]
    np.testing.assert_array_equal(stats["tokenize"]["lengths"], first_stats["tokenize"]["lengths"])
    assert stats["tokenize"]["train"] == first_stats["tokenize"]["train"]
    assert stats["tokenize"]["tokenizer"]["dir"] == str(run_dir / "tokens" / "tokenizer")


def test_restored_outputs_match_an_uncached_run_byte_for_byte(first):
    root, inputs, first_dir, _ = first
    cached_dir, _, ran = run_stages(inputs, root / "runs", "cached")
    assert not any(ran.values())
    uncached_dir, _, ran = run_stages(inputs, root / "runs-uncached", "plain", "run.cache=false")
    assert all(ran.values())
    assert not (root / "runs-uncached" / ".cache").exists()
    assert files(cached_dir) == files(uncached_dir)


def test_one_changed_byte_in_any_input_file_misses_every_stage(first, tmp_path):
    _, inputs, _, _ = first
    changed = tmp_path / "inputs"
    changed.mkdir()
    for p in inputs.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "runs"
    _, _, ran = run_stages(changed, out, "a")
    assert all(ran.values())
    # Same size, one byte different, in the second file of the directory.
    data = bytearray((changed / "part-1.jsonl").read_bytes())
    data[data.index(b"Yes")] = ord("y")
    (changed / "part-1.jsonl").write_bytes(bytes(data))
    _, _, ran = run_stages(changed, out, "b")
    assert ran == {"prepare": True, "validate": True, "tokenize": True}


def test_changed_tokenize_setting_reruns_only_tokenize(first):
    root, inputs, _, first_stats = first
    run_dir, stats, ran = run_stages(inputs, root / "runs", "shorter", "tokenize.max_seq_len=64")
    assert ran == {"prepare": False, "validate": False, "tokenize": True}
    assert stats["tokenize"]["train"]["max_seq_len"] == 64
    assert json.loads((run_dir / "tokens" / "train" / "index.json").read_text())["max_seq_len"] == 64


def test_changed_split_reruns_from_validate_and_reject_threshold_from_prepare(first):
    root, inputs, _, _ = first
    _, _, ran = run_stages(inputs, root / "runs", "val-split", "data.val_fraction=0.3")
    assert ran == {"prepare": False, "validate": True, "tokenize": True}  # prepare does not read the split
    _, _, ran = run_stages(inputs, root / "runs", "suite", "validation.max_turns=12")
    assert ran == {"prepare": False, "validate": True, "tokenize": True}
    _, _, ran = run_stages(inputs, root / "runs", "threshold", "validation.max_reject_fraction=0.4")
    assert ran == {"prepare": True, "validate": True, "tokenize": True}


def test_irrelevant_setting_keeps_every_hit(first):
    root, inputs, _, _ = first
    _, _, ran = run_stages(inputs, root / "runs", "other-lr", "train.lr=0.5", "eval.enabled=false",
                           "lora.r=2", "model.method=full")
    assert ran == {"prepare": False, "validate": False, "tokenize": False}


def test_train_settings_never_invalidate_the_tokenize_cache(first):
    # The shards do not depend on the batch sizes, the seed or the grouping (leantune/shards.py estimates the
    # padding on the training side), packed or not; a tokenize setting does invalidate them.
    root, inputs, _, _ = first
    _, _, ran = run_stages(inputs, root / "runs", "packed-mb", "train.micro_batch_size=2", "train.seed=9")
    assert ran == {"prepare": False, "validate": False, "tokenize": False}
    unpacked, _, ran = run_stages(inputs, root / "runs", "unpacked", "tokenize.packing=false")
    assert ran == {"prepare": False, "validate": False, "tokenize": True}
    other, _, ran = run_stages(inputs, root / "runs", "unpacked-mb", "tokenize.packing=false",
                               "train.micro_batch_size=2", "train.global_batch_size=4", "train.seed=9",
                               "train.group_by_length=true")
    assert ran == {"prepare": False, "validate": False, "tokenize": False}
    assert files(other) == files(unpacked)
    _, _, ran = run_stages(inputs, root / "runs", "unpacked-len", "tokenize.packing=false",
                           "train.micro_batch_size=2", "tokenize.max_seq_len=96")
    assert ran == {"prepare": False, "validate": False, "tokenize": True}


def test_tokenize_writes_only_into_tokens(first, tmp_path):
    _, inputs, _, _ = first
    cfg = load_config(overrides=[*SMALL, f"data.sources=[{{kind: file, path: '{inputs}', name: qa}}]",
                                 f"run.output_dir={tmp_path}", "run.name=t", "run.cache=false"])
    layout = RunDir(create_run_dir(cfg))
    prepare(cfg, layout.data)
    validate_records(cfg, layout.data)
    before = files(layout.root)
    stats = tokenize(cfg, layout.data, layout.tokens)
    after = files(layout.root)
    assert {k: v for k, v in after.items() if not k.startswith("tokens/")} == before
    lengths = json.loads(layout.token_lengths.read_text())
    assert lengths["count"] == stats["train"]["counts"]["records_read"] == len(stats["lengths"])
    assert lengths["max"] == int(stats["lengths"].max()) and lengths["total"] == int(stats["lengths"].sum())


def copy_cache(first, out: Path) -> Path:
    """The first run's cache entries, copied into `out`'s own cache (so a test may damage them)."""
    import shutil

    root, _, _, _ = first
    shutil.copytree(root / "runs" / ".cache", out / ".cache")
    return out / ".cache"


def entry_of(first, cache: Path, stage: str) -> Path:
    """The cache entry of `stage` for the first run's config."""
    from leantune.stagecache import STAGE_KEYS

    _, inputs, _, _ = first
    return cache / stage / STAGE_KEYS[stage](stage_config(inputs, cache.parent, "any"))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, stage, problem", [
    ("delete a shard", "tokenize", "files/tokens/train/shard-00000.tokens.npy is missing"),
    ("delete the manifest", "validate", "manifest.json is missing (an incomplete entry)"),
    ("flip a byte", "prepare", "records.jsonl does not match its sha256 (corrupted)"),
    ("flip a byte of the stats", "tokenize", "stats.json does not match its sha256 (corrupted)"),
    ("truncate a file", "validate", "has 10 bytes, the manifest says"),
])
def test_an_incomplete_or_corrupted_entry_is_a_miss_and_is_replaced(first, tmp_path, caplog, damage, stage, problem):
    _, inputs, first_dir, _ = first
    cache = copy_cache(first, tmp_path / "runs")
    entry = entry_of(first, cache, stage)
    if damage == "delete a shard":
        (entry / "files" / "tokens" / "train" / "shard-00000.tokens.npy").unlink()
    elif damage == "delete the manifest":
        (entry / "manifest.json").unlink()
    elif damage == "flip a byte":
        flip_byte(entry / "files" / "data" / "records.jsonl")
    elif damage == "flip a byte of the stats":
        flip_byte(entry / "stats.json")
    else:
        (entry / "files" / "data" / "train.jsonl").write_bytes(b"0123456789")
    with caplog.at_level("WARNING", logger="leantune.stagecache"):
        run_dir, _, ran = run_stages(inputs, tmp_path / "runs", "again")
    assert ran == {s: s == stage for s in STAGES}  # only the damaged stage runs; the later ones still hit
    assert f"the {stage} entry {entry} is damaged" in caplog.text and problem in caplog.text
    assert files(run_dir) == files(first_dir)
    # The damaged entry was replaced by a complete one: the next run hits every stage.
    assert (entry / "manifest.json").is_file()
    _, _, ran = run_stages(inputs, tmp_path / "runs", "third")
    assert not any(ran.values())


def test_a_cache_deleted_while_a_stage_stores_into_it_does_not_fail_the_run(first, tmp_path, caplog, monkeypatch):
    import shutil

    from leantune import stagecache

    _, inputs, first_dir, _ = first
    cache = copy_cache(first, tmp_path / "runs")
    shutil.rmtree(entry_of(first, cache, "tokenize"))
    copy = stagecache._copy_hashed

    def deleted_meanwhile(src, dst):
        entry = copy(src, dst)
        if dst is not None and cache in dst.parents and (cache / "prepare").exists():
            shutil.rmtree(cache)  # the user clears the cache while the run copies its files into it
        return entry

    monkeypatch.setattr(stagecache, "_copy_hashed", deleted_meanwhile)
    with caplog.at_level("WARNING", logger="leantune.stagecache"):
        run_dir, stats, ran = run_stages(inputs, tmp_path / "runs", "again")
    assert ran == {"prepare": False, "validate": False, "tokenize": True}
    assert "could not store the tokenize outputs in" in caplog.text and "the run goes on" in caplog.text
    assert files(run_dir) == files(first_dir) and stats["tokenize"]["train"]["counts"]["records_read"] > 0
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-written was published


@pytest.mark.slow
@pytest.mark.flow
def test_flow_tasks_skip_cached_stages_and_say_so(prefect_server, first, tmp_path):
    import logging

    from prefect import flow

    from tasks.prepare import prepare_data
    from tasks.tokenize import tokenize_data
    from tasks.validate import validate_data

    _, inputs, _, first_stats = first
    out = tmp_path / "runs"

    @flow
    def data_stages(name: str) -> dict:
        cfg = load_config(overrides=[*SMALL, f"data.sources=[{{kind: file, path: '{inputs}', name: qa}}]",
                                     f"run.output_dir={out}", f"run.name={name}"])
        run_dir = create_run_dir(cfg)
        return {"prepare": prepare_data(cfg, run_dir), "validate": validate_data(cfg, run_dir),
                "tokenize": tokenize_data(cfg, run_dir)}

    # Prefect's loggers do not propagate to the root logger that pytest's caplog listens on.
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(handler)
    try:
        data_stages("a")
        assert not [m for m in messages if "skipped" in m]
        assert len([m for m in messages if m.startswith(("prepare: read", "validate: 60", "tokenize: 49"))]) == 3
        stats = data_stages("b")
    finally:
        task_logger.removeHandler(handler)
    skipped = [m.split(":")[0] for m in messages if "skipped, same" in m]
    assert skipped == ["prepare", "validate", "tokenize"]
    assert stats["prepare"]["totals"] == first_stats["prepare"]["totals"]
    assert files(out / "a") == files(out / "b")

"""Progress bars of prepare and tokenize: drawn on a terminal, silent in logs; third-party bars off in the flows."""

import io
import logging
import os
import re
import sys

import pytest

from leantune.config import load_config
from leantune.data.prepare import prepare
from leantune.progress import quiet_third_party
from leantune.tokenization import tokenize


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prepare_and_tokenize_bars_count_rows_on_a_terminal_and_stay_silent_elsewhere(tmp_path, monkeypatch):
    cfg = load_config(overrides=["data.synthetic.num_records=60", "data.chunk_size=25", "data.val_fraction=0.1"])
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    stats = prepare(cfg, tmp_path / "data")
    # The split by hand (the validate stage's job): tokenize reads train.jsonl and val.jsonl.
    records = (tmp_path / "data" / "records.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "data" / "train.jsonl").write_text("".join(records[:50]))
    (tmp_path / "data" / "val.jsonl").write_text("".join(records[50:]))
    tokenized = tokenize(cfg, tmp_path / "data", tmp_path / "tokens")

    drawn = terminal.getvalue()
    # The last update of each bar shows every row or record read.
    assert re.findall(r"prepare synthetic: (\d+)row", drawn)[-1] == str(stats["totals"]["read"]) == "60"
    assert re.findall(r"tokenize train: (\d+)record", drawn)[-1] == str(tokenized["train"]["counts"]["records_read"])
    assert re.findall(r"tokenize val: (\d+)record", drawn)[-1] == str(tokenized["val"]["counts"]["records_read"])
    assert tokenized["train"]["counts"]["records_read"] == 50

    log_file = io.StringIO()  # not a terminal: a log file, a Prefect worker, CI
    monkeypatch.setattr(sys, "stderr", log_file)
    prepare(cfg, tmp_path / "again")
    assert log_file.getvalue() == ""


def test_quiet_third_party_turns_off_the_libraries_bars(monkeypatch):
    import datasets
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.setenv(name, "")  # so that monkeypatch puts back whatever was there before the test
        monkeypatch.delenv(name)
    datasets.enable_progress_bars()
    huggingface_hub.utils.enable_progress_bars()
    transformers_logging.enable_progress_bar()

    quiet_third_party()

    assert not datasets.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()
    assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for libraries imported later, and child processes


def test_a_long_stage_logs_items_done_rate_and_eta_every_few_seconds(caplog):
    """Filtration and evaluation (score_encoded) log where they are every PROGRESS_EVERY_S seconds; before,
    filtration was seen silent for 17 minutes. A clock that advances 4 s per batch of 10 items."""
    from leantune.progress import StageProgress

    now = [0.0]
    progress = StageProgress("filtration", 100, every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="leantune.progress"):
        for _ in range(10):
            now[0] += 4.0
            progress.update(10)
    assert progress.lines == ["filtration: 30 of 100 items (30%), 2.5 items/s, ETA 00:28",
                              "filtration: 60 of 100 items (60%), 2.5 items/s, ETA 00:16",
                              "filtration: 90 of 100 items (90%), 2.5 items/s, ETA 00:04"]
    assert [r.getMessage() for r in caplog.records] == progress.lines


def test_a_log_line_on_the_terminal_starts_its_own_line_below_the_training_bar():
    """Before: `...8 tokens/s]14:22:56.717 | INFO ...`, the line glued to the bar's end."""
    from tqdm import tqdm

    from tasks.logs import _LinesBelowTheBar

    terminal = io.StringIO()
    bar = tqdm(total=10, desc="train", file=terminal, ncols=60, disable=False)
    bar.update(3)
    handler = logging.StreamHandler(terminal)
    handler.addFilter(_LinesBelowTheBar())
    logger = logging.getLogger("test_progress.bar")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a log line")
    finally:
        logger.removeHandler(handler)
        bar.close()
    drawn = terminal.getvalue()
    assert "3/10" in drawn and drawn[:drawn.index("a log line")].endswith("\r")


def test_a_bar_drawn_with_tqdm_directly_stays_off_and_leantunes_own_bars_draw():
    """transformers' GGUF conversion draws with tqdm itself, past its own switch: quiet_third_party sets
    TQDM_DISABLE, which tqdm reads when first imported (in the flows, after quiet_third_party)."""
    import subprocess

    script = ("import io; from leantune.progress import quiet_third_party; quiet_third_party()\n"
              "from tqdm.auto import tqdm\n"
              "gguf, ours = io.StringIO(), io.StringIO()\n"
              "list(tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...', file=gguf))\n"
              "list(tqdm(range(3), desc='train', file=ours, disable=False))\n"
              "print(repr(gguf.getvalue()), '3/3' in ours.getvalue())")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["''", "True"]


def test_stage_times_read_as_seconds_minutes_and_hours():
    from leantune.progress import stage_times_text

    assert stage_times_text({"prepare": 2.4, "validate": 59.6, "train": 185.0, "evaluate": 3725.0}) == \
        "stage times: prepare 2s, validate 1m00s, train 3m05s, evaluate 1h02m"


@pytest.mark.flow
def test_a_long_stages_progress_moves_a_bar_in_the_ui(prefect_server):
    """Filtration's and evaluation's progress lines move a Prefect progress artifact (a bar), 100% at the end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from leantune.progress import StageProgress
    from tasks.logs import stage_progress_artifact

    def bar():
        with get_client(sync_client=True) as client:
            [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["test-bar"])))
        return artifact.data, artifact.description

    now = [0.0]
    with stage_progress_artifact("test-bar", "Filtration"):
        progress = StageProgress("filtration", 100, every_s=10.0, clock=lambda: now[0])
        for _ in range(7):
            now[0] += 4.0
            progress.update(10)
        assert bar() == (60.0, "filtration: 60 of 100 items (60%), 2.5 items/s, ETA 00:16")
    assert bar() == (100.0, "Filtration: done")


@pytest.mark.slow  # two interpreters importing torch
def test_bitsandbytes_notice_is_silenced_in_the_flow_and_training_processes():
    """bitsandbytes' CPU backend logs a notice (the `kernels` package's 4-bit matmul not loaded) in every
    process that imports it; quiet_third_party, which the flow and the training process call first, drops it."""
    import subprocess
    import sys

    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr

    if "gemm_4bit" not in stderr_of("import bitsandbytes"):
        pytest.skip("bitsandbytes prints no kernels notice on this machine")
    assert "gemm_4bit" not in stderr_of("from leantune.progress import quiet_third_party\n"
                                        "quiet_third_party()\nimport peft, bitsandbytes")

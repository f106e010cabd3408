"""Test settings: offline Prefect in a temporary home, one test server per session, CUDA-only skips."""

import os
import signal
import tempfile
from pathlib import Path

import pytest

# Set before anything imports prefect: no telemetry, a private PREFECT_HOME and result storage,
# so that tests never touch the user's Prefect database and caches never leak between runs.
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="leantune-test-prefect-"))
os.environ.update({
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_HOME": str(_PREFECT_HOME),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_PREFECT_HOME / "results"),
    "TOKENIZERS_PARALLELISM": "false",
})
# One compute thread per test process (and its subprocesses): on a small shared machine OpenMP's
# spinning threads slow tests several-fold, and one thread keeps CPU results reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A test run started in the background of a non-interactive shell (`pytest ... &`, nohup) inherits SIGINT
# ignored, and so would every flow process it starts; the stop tests send Ctrl-C as a terminal does. With
# Python's own handler here, children start with the default again (exec resets a handled signal).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (starting one takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The run directory the training tests start from: 200 synthetic records through prepare,
# validation and tokenization, a scratch tokenizer of 1000 ids (records of ~80-120 tokens) and
# packing into 256 tokens (two or three documents per sequence), so both packed attention and
# variable widths are exercised. Its config.yaml holds these settings; tests load it and add
# their own train/model overrides.
TOKENIZED_RUN_OVERRIDES = [
    "data.synthetic.num_records=200", "data.val_fraction=0.1", "data.chunk_size=100",
    "tokenize.vocab_size=1000", "tokenize.max_seq_len=256", "tokenize.packing=true",
    "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64", "model.scratch.num_layers=2",
    "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "lora.r=4", "lora.alpha=8",
    "lora.dropout=0.0", "train.device=cpu", "train.global_batch_size=8", "train.micro_batch_size=4",
    "train.warmup_steps=2", "train.lr=1e-2",
]


@pytest.fixture(scope="session")
def tokenized_run(tmp_path_factory) -> Path:
    """A pristine run directory after the data stages (config.yaml, data/, tokens/); built once.

    Copy it before use: `shutil.copytree(tokenized_run, tmp_path / "run")`.
    """
    from leantune.config import dump_config, load_config
    from leantune.data.prepare import prepare
    from leantune.tokenization import tokenize
    from leantune.validation import validate_records, validate_tokens

    run_dir = tmp_path_factory.mktemp("tokenized") / "run"
    cfg = load_config(overrides=[*TOKENIZED_RUN_OVERRIDES, f"run.output_dir={run_dir.parent}", "run.name=run"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    prepare(cfg, run_dir / "data")
    validate_records(cfg, run_dir / "data")
    tokenize(cfg, run_dir / "data", run_dir / "tokens")
    validate_tokens(cfg, run_dir / "tokens")  # the data stages' last step: a resume sees them done
    return run_dir

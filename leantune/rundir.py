"""The run directory, runs/<name>/: created once per run, holding the resolved config and every output.

`RunDir` names every file and folder a run writes, in one place; stages, tasks, flows and the report
take their paths from it. `DataDir`, `TokenDir` and `EvalDir` name the files inside data/, tokens/ and
eval/ (the stages write them into any such folder: a profile has tokens/seq-<L>/, the evaluate flow
its own output folder). Inside a token split, the shard files are leantune/shards.py's format;
the two files other stages read are SPLIT_INDEX and SPLIT_LENGTHS. Each stage writes only its own
files. Also here: the one writer of config.yaml (`write_config`), the run directory's creation and
checks, and the attempt history (attempts.jsonl, attempts/attempt-N/).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from leantune.config import RunConfig, dump_config
from leantune.errors import UserError

# A checkpoint directory, checkpoints/step-N/ (N = optimizer steps completed).
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class _Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class RunDir(_Layout):
    """The layout of runs/<name>/ (README "What a run writes")."""

    @classmethod
    def of(cls, run_dir: str | Path | RunDir) -> RunDir:
        return run_dir if isinstance(run_dir, RunDir) else cls(Path(run_dir))

    @property
    def config(self) -> Path:
        """The resolved config (`write_config`)."""
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        """Prepare's, filtration's and validate's outputs (`DataDir`)."""
        return self.root / "data"

    @property
    def data_dir(self) -> DataDir:
        return DataDir(self.data)

    @property
    def tokens(self) -> Path:
        """Tokenize's outputs (`TokenDir`): the token shards training reads, the tokenizer, the token checks."""
        return self.root / "tokens"

    @property
    def token_dir(self) -> TokenDir:
        return TokenDir(self.tokens)

    @property
    def train_tokens(self) -> Path:
        return self.token_dir.train

    @property
    def val_tokens(self) -> Path:
        return self.token_dir.val

    @property
    def train_index(self) -> Path:
        return self.token_dir.index("train")

    @property
    def tokenizer(self) -> Path:
        return self.token_dir.tokenizer

    @property
    def token_lengths(self) -> Path:
        return self.token_dir.lengths

    @property
    def token_validation(self) -> Path:
        return self.token_dir.validation

    @property
    def metrics(self) -> Path:
        """One line per optimizer step and per event (leantune/metrics.py)."""
        return self.root / "metrics.jsonl"

    @property
    def monitor(self) -> Path:
        """The resource samples (leantune/monitor/sampler.py); of the first machine in a multi-node run."""
        return self.root / "monitor.csv"

    def node_monitor(self, node: int) -> Path:
        """Machine `node`'s resource samples (monitor.csv for the first)."""
        return self.monitor if node == 0 else self.root / f"monitor-node{node}.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        """The final adapter (PEFT format) or, for a full fine-tune, the whole model."""
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        """With train.export_merged: the adapter merged into the base."""
        return self.root / "merged"

    @property
    def training(self) -> Path:
        """The summary training returns (training.json)."""
        return self.root / "training.json"

    @property
    def cost(self) -> Path:
        return self.root / "cost.json"

    @property
    def eval(self) -> Path:
        """base.json, tuned.json, comparison.json and the chart of the evaluation."""
        return self.root / "eval"

    @property
    def eval_dir(self) -> EvalDir:
        return EvalDir(self.eval)

    @property
    def attempts(self) -> Path:
        """attempts/attempt-N/: the checkpoints and metrics of each failed attempt, kept."""
        return self.root / "attempts"

    @property
    def attempt_log(self) -> Path:
        """One line per training attempt (attempts.history_entry)."""
        return self.root / "attempts.jsonl"

    @property
    def failure(self) -> Path:
        """How a failed training process ended (leantune.failures.write_failure)."""
        return self.root / "attempt_error.json"

    def power_record(self, gpu: int, node: int = 0) -> Path:
        """GPU `gpu` (NVML's index) of machine `node`: its power limit before the run's first cap
        (monitor/power.py); gone once restored."""
        return self.root / f"power_limit_original-node{node}-gpu{gpu}.json"

    @property
    def tracking(self) -> Path:
        """Where the run is tracked: the MLflow run and the steps logged (leantune/tracking.py)."""
        return self.root / "tracking.json"

    @property
    def tensorboard(self) -> Path:
        """The TensorBoard log directory (tracking.tensorboard)."""
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        """Held while a flow works in the run (leantune/runlock.py)."""
        return self.root / ".lock"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def plot(self, stem: str) -> Path:
        """A report chart, <stem>.png."""
        return self.root / f"{stem}.png"


@dataclass(frozen=True)
class DataDir(_Layout):
    """What the data stages write into a data directory (a run's data/, or a profile's)."""

    @property
    def records(self) -> Path:
        """Prepare: the canonical records kept."""
        return self.root / "records.jsonl"

    @property
    def rejects(self) -> Path:
        """Prepare: every rejected row with its source, line and reason."""
        return self.root / "rejects.jsonl"

    @property
    def duplicates(self) -> Path:
        return self.root / "duplicates.jsonl"

    @property
    def prepare(self) -> Path:
        """Prepare's accounting per source."""
        return self.root / "prepare.json"

    @property
    def filtration(self) -> Path:
        """The filtration stage's summary (leantune/evaluation/filtration.py)."""
        return self.root / "filtration.json"

    @property
    def train(self) -> Path:
        """Validate: the records training uses."""
        return self.root / "train.jsonl"

    @property
    def val(self) -> Path:
        return self.root / "val.jsonl"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    @property
    def validation(self) -> Path:
        """The record suite's result."""
        return self.root / "validation.json"

    @property
    def quality(self) -> Path:
        """Validate's data-quality metrics of the records (leantune/data/quality.py)."""
        return self.root / "quality.json"


@dataclass(frozen=True)
class EvalDir(_Layout):
    """What the evaluation writes into its output directory (a run's eval/, or the evaluate flow's)."""

    def result(self, label: str) -> Path:
        """One model's results per set ("base", "tuned", or a model's label)."""
        return self.root / f"{label}.json"

    @property
    def comparison(self) -> Path:
        """Base against tuned on the same items."""
        return self.root / "comparison.json"

    @property
    def chart(self) -> Path:
        return self.root / "sycophancy.png"


# Files of a token split that other stages read (leantune/shards.py documents the split's files).
SPLIT_INDEX = "index.json"  # counts, tokens, the tokenizer, the tokenize config hash
SPLIT_LENGTHS = "lengths.npy"  # the token length of every record


@dataclass(frozen=True)
class TokenDir(_Layout):
    """What tokenize writes into a tokens directory (a run's tokens/, or a profile's tokens/seq-N/)."""

    def split(self, name: str) -> Path:
        return self.root / name

    @property
    def train(self) -> Path:
        return self.split("train")

    @property
    def val(self) -> Path:
        return self.split("val")

    def index(self, split: str) -> Path:
        return self.split(split) / SPLIT_INDEX

    def record_lengths(self, split: str) -> Path:
        return self.split(split) / SPLIT_LENGTHS

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def lengths(self) -> Path:
        """Percentiles of the train records' token lengths (the report shows them with data/quality.json's)."""
        return self.root / "lengths.json"

    @property
    def validation(self) -> Path:
        """The token suite's result, the data stages' last output (`data_stages_done`)."""
        return self.root / "validation.json"


def write_config(run_dir: str | Path | RunDir, cfg: RunConfig) -> Path:
    """Write the resolved config to run_dir/config.yaml: the one writer of that file."""
    path = RunDir.of(run_dir).config
    path.write_text(dump_config(cfg))
    return path


def default_run_name(config_name: str) -> str:
    return f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(cfg: RunConfig, config_name: str = "run") -> Path:
    """Make runs/<name>/ with data/ and tokens/, and write the resolved config to config.yaml.

    An existing, non-empty run directory is refused: outputs of two runs must never mix.
    """
    name = cfg.run.name or default_run_name(config_name)
    run_dir = Path(cfg.run.output_dir) / name
    if problem := run_dir_problem(cfg, name):
        raise UserError(problem)
    layout = RunDir(run_dir)
    layout.data.mkdir(parents=True, exist_ok=True)
    layout.tokens.mkdir(exist_ok=True)
    write_config(layout, cfg)
    return run_dir


def set_aside_attempt(run_dir: str | Path | RunDir, attempt: int) -> Path | None:
    """Move the checkpoints and metrics.jsonl of a failed attempt to attempts/attempt-N/ (never deleted), so
    that a next attempt starting from step 0 does not overwrite them; return that folder, None when there
    was nothing to move."""
    layout = RunDir.of(run_dir)
    kept = layout.attempts / f"attempt-{attempt}"
    moved = None
    for path in (layout.checkpoints, layout.metrics):
        if path.exists():
            kept.mkdir(parents=True, exist_ok=True)
            shutil.move(path, kept / path.name)
            moved = kept
    return moved


def append_attempt(run_dir: str | Path | RunDir, entry: dict) -> None:
    """Add one attempt (leantune.attempts.history_entry) to the run's attempts.jsonl."""
    with open(RunDir.of(run_dir).attempt_log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def checkpointed_step(run_dir: Path) -> int:
    """The step of the newest checkpoint (checkpoints/step-N, renamed into place whole), 0 when there is none."""
    directory = RunDir(run_dir).checkpoints
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := STEP_DIR.match(p.name))] \
        if directory.is_dir() else []
    return max(steps, default=0)


def read_attempts(run_dir: str | Path | RunDir) -> list[dict] | None:
    """The run's attempt history, one entry per attempt in order; None when there is no attempts.jsonl."""
    path = RunDir.of(run_dir).attempt_log
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def existing_run_dir(cfg: RunConfig) -> Path:
    """The directory of the run to resume (run.output_dir/run.name); it must hold the config.yaml its first
    attempt wrote."""
    if cfg.run.name is None:
        raise UserError("resume: run.name is not set; name the run to continue (--resume RUN_NAME)")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if not RunDir(run_dir).config.is_file():
        raise UserError(f"resume: {run_dir} is not a leantune run directory (no config.yaml); check the run "
                        "name and run.output_dir, or start a new run without --resume")
    return run_dir


def run_dir_problem(cfg: RunConfig, name: str | None = None) -> str | None:
    """Why a new run named `name` (default: run.name) cannot start, or None: its directory exists and is not empty."""
    name = name or cfg.run.name
    run_dir = Path(cfg.run.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        return (f"run directory {run_dir} already exists and is not empty; continue that run with "
                f"--resume {name}, choose another name with --run-name (or run.name in the config), or "
                f"delete that directory")
    return None


def data_stages_done(run_dir: Path) -> bool:
    """Whether prepare, validate and tokenize all finished in `run_dir`: the token suite, the data stages'
    last step, passed (tokens/validation.json). A resume of a run that stopped before that (a data error,
    a kill) runs the data stages again instead of training on tokens that are missing or partial."""
    path = RunDir.of(run_dir).token_validation
    try:
        return json.loads(path.read_text()).get("success") is True
    except (OSError, ValueError, AttributeError):
        return False

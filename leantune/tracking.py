"""Experiment tracking: a run's config, per-step metrics, figures and artifacts in MLflow and TensorBoard.

Config section `tracking`. One MLflow run per leantune run, named like the run directory, in the
experiment tracking.mlflow_experiment; by default in the SQLite store <run.output_dir>/mlflow.db with
artifacts in <run.output_dir>/mlartifacts/ (every run under run.output_dir in one store, so runs of
different days compare side by side), or at tracking.mlflow_uri (a server or another database).
TensorBoard event files go to <run dir>/tensorboard/. What the run logged to is kept in
<run dir>/tracking.json, so a resumed run (--resume, another attempt) continues the same MLflow run;
a sweep's members are children of the sweep's run (tracking.parent_run_id, `start_parent_run`).

What is logged:
  params     the resolved config at the run's start, flattened (train.lr, lora.r, data.sources.0.kind, ...)
  tags       leantune.run_name, leantune.run_dir, and what the caller adds (the Prefect flow run id and name)
  per step   every number of a metrics.jsonl step line: train/loss, train/lr, train/grad_norm,
             train/tokens_per_s, train/micro_batch_size, train/peak_memory_mb, train/energy_j (with NVML), ...;
             val/loss on evaluation steps
  figures    once each, when their file exists: data/* (quality.json: rows read, kept, rejected, ...),
             validation/* (validation.json), tokens/* (tokens/train/index.json), training/* (training.json),
             eval/<set>/<group>/* (eval/comparison.json: base and tuned rates with their intervals, the
             difference with its interval, McNemar's p); MLflow metrics at step 0; in TensorBoard one
             text table per group (its Text tab), so that its scalars are the training curves alone
  artifacts  (MLflow) config.yaml, report.md, the plots (*.png, eval/*.png), adapter/; the plots are
             TensorBoard images too (plots/loss, plots/memory, plots/eval/sycophancy, ...)

TensorBoard's step charts are grouped in a few sections (TENSORBOARD_SECTIONS), which it lists in
alphabetical order: loss/train and loss/validation first, then memory/peak_memory_mb, moe/*, power/energy_j,
preference/*, speed/* (tokens/s, micro-batch, ...), train/lr, train/grad_norm, train/epoch. MLflow keeps the
names above.

Steps are logged once a checkpoint holds them (the newest checkpoints/step-N). A training process killed
after step N+k resumes from step N and runs N+1... again, possibly with other values (a NaN retry lowers
the lr): logging only what a checkpoint holds means no step is logged twice and every logged value is the
one metrics.jsonl ends with. The count of steps logged is kept in tracking.json; on start it is raised
to the last step MLflow has, and TensorBoard's writer purges anything logged after it. An attempt that
starts over (attempts.py moves its checkpoints away) logs its steps again from step 1.

Tracking never fails a run: a backend whose call fails (an unreachable server, a locked database) is
reported once in the log and left out for the rest of the flow run, and the run goes on. An http(s)
server is first tried with a plain connection (CONNECT_TIMEOUT_S), so a closed port costs no retries.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

from leantune.config import RunConfig, dump_config
from leantune.metrics import read_metrics
from leantune.resume import flatten_config
from leantune.rundir import RunDir, checkpointed_step

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
PARAM_MAX_CHARS = 6000  # MLflow refuses longer param values; config.yaml (an artifact) has them whole
LOSS_KEY = "train/loss"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI picks its view (runs or GenAI traces) by it
# The files whose numbers are logged once, as (group, its path in a run directory, the part of it logged).
FIGURES = (
    ("data", lambda r: r.data_dir.quality,
     lambda d: {**d.get("totals", {}), **{f"{k}_rate": v for k, v in d.get("rates", {}).items()}}),
    ("validation", lambda r: r.data_dir.validation, lambda d: {k: v for k, v in d.items() if k != "expectations"}),
    ("tokens", lambda r: r.train_index, lambda d: {**d.get("counts", {}), **d.get("tokens", {})}),
    ("training", lambda r: r.training, lambda d: d),
    ("eval", lambda r: r.eval_dir.comparison, lambda d: d.get("sets", {})),
)


# TensorBoard's section of each metrics.jsonl key that is not a train/ curve (loss, lr, grad_norm, epoch).
TENSORBOARD_SECTIONS = {
    "peak_memory_mb": "memory", "energy_j": "power", "router_aux_loss": "moe", "expert_imbalance_max": "moe",
    **dict.fromkeys(("pref_accuracy", "reward_margin", "logp_chosen", "logp_rejected"), "preference"),
    **dict.fromkeys(("tokens_per_s", "tokens", "micro_batch_size", "accumulation_steps", "world_size", "elapsed_s"),
                    "speed"),
}


# The loss curves, training and validation side by side in the section TensorBoard lists first.
TENSORBOARD_LOSS_TAGS = {LOSS_KEY: "loss/train", "val/loss": "loss/validation"}


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a step metric (step_metrics' name): train/<key> moves to its section."""
    if name in TENSORBOARD_LOSS_TAGS:
        return TENSORBOARD_LOSS_TAGS[name]
    group, _, key = name.partition("/")
    return f"{TENSORBOARD_SECTIONS[key]}/{key}" if group == "train" and key in TENSORBOARD_SECTIONS else name


def figures_table(values: dict[str, float]) -> str:
    """A group of figures (numbers' output) as a markdown table for TensorBoard's Text tab."""
    return "| figure | value |\n|---|---|\n" + "".join(f"| {k} | {v:.6g} |\n" for k, v in values.items())


def mlflow_uri(cfg: RunConfig) -> str:
    """tracking.mlflow_uri, or the local SQLite store under run.output_dir."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    return f"sqlite:///{Path(cfg.run.output_dir).resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on a store (a server is opened in the browser instead)."""
    return uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"


def tracking_lines(run_dir: Path) -> list[str]:
    """Where the run is tracked (its tracking.json), as markdown lines for the report and the flow's artifact."""
    path = RunDir(run_dir).tracking
    state = json.loads(path.read_text()) if path.is_file() else {}
    lines = []
    if "mlflow" in state:
        m = state["mlflow"]
        lines.append(f"MLflow: run `{m['run_id']}` in experiment `{m['experiment']}` ({m['tracking_uri']}); "
                     f"open it with `{ui_command(m['tracking_uri'])}`")
    if "tensorboard" in state:
        lines.append(f"TensorBoard: `tensorboard --logdir {state['tensorboard']['logdir']}`")
    return lines


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The config flattened to dotted keys, values as MLflow params (text of at most PARAM_MAX_CHARS)."""
    flat: dict = {}
    flatten_config(cfg.model_dump(mode="json"), "", flat)
    return {k: (v if isinstance(v, str) else json.dumps(v))[:PARAM_MAX_CHARS] for k, v in flat.items()}


_METRIC_NAME_UNSAFE = re.compile(r"[^0-9A-Za-z_.\- ]")  # MLflow takes these (and '/', the separator)


def numbers(obj, prefix: str) -> dict[str, float]:
    """The numeric leaves of a JSON object as {"prefix/a/b": value}; an interval [low, high] under a key
    ending in "_ci" becomes key_low and key_high; booleans count as 0/1; other lists and None are left out."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}/{_METRIC_NAME_UNSAFE.sub('_', str(key))}"
            if str(key).endswith("_ci") and isinstance(value, list) and len(value) == 2:
                out.update(numbers({f"{key}_low": value[0], f"{key}_high": value[1]}, prefix))
            else:
                out.update(numbers(value, name))
    elif isinstance(obj, (bool, int, float)) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


def step_metrics(line: dict) -> dict[str, float]:
    """A metrics.jsonl step line as metric names and values: val_loss as val/loss, the rest as train/<key>."""
    return {("val/loss" if key == "val_loss" else f"train/{key}"): float(value) for key, value in line.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def _check_reachable(uri: str) -> None:
    """For an http(s) URI: a plain connection to the server, so a closed port fails in seconds, not after
    the MLflow client's retries."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(f"cannot connect to the MLflow server {uri}: {error}") from error


def _experiment_id(client, cfg: RunConfig) -> str:
    """The id of tracking.mlflow_experiment, created when new: the default store keeps its artifacts beside
    it (<run.output_dir>/mlartifacts); a server or a given database decides where they go."""
    experiment = client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None if cfg.tracking.mlflow_uri else (Path(cfg.run.output_dir).resolve() / "mlartifacts").as_uri()
    # Model training, not GenAI: MLflow 3's UI opens such an experiment on its runs.
    return client.create_experiment(cfg.tracking.mlflow_experiment, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: "custom_model_development"})


def _never_fails(method: Callable) -> Callable:
    """A Tracker method that reports its first failure (a full disk, a file another process is moving) and
    otherwise goes on silently: tracking never fails a run."""
    @functools.wraps(method)
    def safe(self: Tracker, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if "tracker" not in self.problems:
                self.problems["tracker"] = f"{type(error).__name__}: {error}"
                log.warning("tracking: %s failed (%s); the run goes on", method.__name__, self.problems["tracker"])

    return safe


class Tracker:
    """The MLflow run and TensorBoard writer of one leantune run, as the flow process sees them.

    Every method is safe to call whatever happens: a backend that fails is reported once and dropped.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.layout = RunDir(run_dir)
        self.state: dict = {}
        path = self.layout.tracking
        try:
            self.state = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as error:
            log.warning("tracking: %s is unreadable (%s); the run is tracked as a new one", path, error)
        self.state.setdefault("steps_logged", 0)
        self.state.setdefault("figures_logged", [])
        self.active = {"mlflow": cfg.tracking.mlflow, "tensorboard": cfg.tracking.tensorboard}
        self.problems: dict[str, str] = {}
        self._client = None
        self._writer = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id, or None (MLflow off or unreachable)."""
        return self.state.get("mlflow", {}).get("run_id") if self.active["mlflow"] else None

    def _guard(self, backend: str, call: Callable, *args) -> None:
        if not self.active[backend]:
            return
        try:
            call(*args)
        except Exception as error:  # noqa: BLE001 - tracking never fails a run
            self.active[backend] = False
            self.problems[backend] = f"{type(error).__name__}: {error}"
            log.warning("tracking: %s left out for the rest of this run (%s); the run goes on",
                        backend, self.problems[backend])

    def _save(self) -> None:
        # Whole or not at all: a kill mid-write must not leave a file the resumed run cannot read.
        path = self.layout.tracking
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------ start

    @_never_fails
    def start(self, tags: dict[str, str] | None = None) -> None:
        """Start the MLflow run, or continue the one tracking.json names; open the TensorBoard writer."""
        tags = {"leantune.run_name": self.run_dir.name, "leantune.run_dir": str(self.run_dir.resolve()),
                **(tags or {})}
        self._guard("mlflow", self._start_mlflow, tags)
        self._guard("tensorboard", self._open_tensorboard)
        self._save()

    def _start_mlflow(self, tags: dict[str, str]) -> None:
        uri = mlflow_uri(self.cfg)
        _check_reachable(uri)
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=uri)
        known = self.state.get("mlflow", {})
        run = None
        if known.get("run_id") and known.get("tracking_uri") == uri:
            try:
                run = client.get_run(known["run_id"])
            except MlflowException:
                log.warning("tracking: MLflow run %s (tracking.json) is not in %s; starting a new one",
                            known["run_id"], uri)
        t = self.cfg.tracking
        if run is None:
            parent = {"mlflow.parentRunId": t.parent_run_id} if t.parent_run_id else {}
            run = client.create_run(_experiment_id(client, self.cfg), run_name=self.run_dir.name,
                                    tags={**tags, **parent})
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in config_params(self.cfg).items()])
            self.state.update(steps_logged=0, figures_logged=[])
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
            logged = [m.step for m in client.get_metric_history(run.info.run_id, LOSS_KEY)]
            self.state["steps_logged"] = max([self.state["steps_logged"], *logged])
        self._client = client
        self.state["mlflow"] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                "experiment": t.mlflow_experiment, "tracking_uri": uri}

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        fresh = not self.layout.tensorboard.is_dir()
        # A folder this process cannot write to (read-only, another user's) fails here, in one warning
        # (_guard), rather than in the writer's own thread, which prints a traceback.
        self.layout.tensorboard.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.layout.tensorboard):
            pass
        # purge_step: TensorBoard hides what an earlier writer logged from this step on (steps not yet logged).
        self._writer = SummaryWriter(str(self.layout.tensorboard),
                                     purge_step=None if fresh else self.state["steps_logged"] + 1)
        if fresh:
            self._writer.add_text("config", f"```yaml\n{dump_config(self.cfg)}\n```", 0)
        self.state["tensorboard"] = {"logdir": str(self.layout.tensorboard.resolve())}

    # ------------------------------------------------------------------------------------ steps

    @_never_fails
    def log_steps(self) -> None:
        """Log the metrics.jsonl steps that the newest checkpoint holds and that are not logged yet."""
        if not (self.active["mlflow"] or self.active["tensorboard"]):
            return
        done = checkpointed_step(self.run_dir)
        if done == self.state["steps_logged"]:
            return
        if done < self.state["steps_logged"]:
            self.state["steps_logged"] = 0  # the attempt started over (its checkpoints were moved away)
        lines = [m for m in read_metrics(self.layout, "step") if self.state["steps_logged"] < m["step"] <= done]
        if not lines:
            return
        now = int(time.time() * 1000)
        batch = [(line["step"], step_metrics(line)) for line in lines]
        self._guard("tensorboard", self._tensorboard_scalars,
                    [(step, {tensorboard_tag(k): v for k, v in values.items()}) for step, values in batch])
        self._guard("mlflow", self._mlflow_metrics, batch, now)
        self.state["steps_logged"] = lines[-1]["step"]
        self._save()

    def _tensorboard_scalars(self, batch: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in batch:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def _tensorboard_text(self, tag: str, markdown: str) -> None:
        self._writer.add_text(tag, markdown, 0)
        self._writer.flush()

    def _mlflow_metrics(self, batch: list[tuple[int, dict[str, float]]], timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        self._client.log_batch(self.run_id, metrics=[Metric(name, value, timestamp_ms, step)
                                                     for step, values in batch for name, value in values.items()])

    # ------------------------------------------------------------------------------------ finish

    @_never_fails
    def log_figures(self) -> None:
        """Log each group of FIGURES whose file exists and that is not logged yet."""
        for group, where, part in FIGURES:
            path = where(self.layout)
            if group in self.state["figures_logged"] or not path.is_file():
                continue
            values = numbers(part(json.loads(path.read_text())), group)
            self._guard("tensorboard", self._tensorboard_text, f"figures/{group}", figures_table(values))
            self._guard("mlflow", self._mlflow_metrics, [(0, values)], int(time.time() * 1000))
            self.state["figures_logged"].append(group)
        self._save()

    @_never_fails
    def log_artifacts(self) -> None:
        """config.yaml, report.md, the plots and the adapter as MLflow artifacts (a second upload replaces them);
        the plots as TensorBoard images."""
        self._guard("mlflow", self._mlflow_artifacts)
        self._guard("tensorboard", self._tensorboard_images)

    def _tensorboard_images(self) -> None:
        from matplotlib.image import imread

        plots = [(p.stem, p) for p in sorted(self.run_dir.glob("*.png"))]
        plots += [(f"eval/{p.stem}", p) for p in sorted(self.layout.eval.glob("*.png"))]
        for name, path in plots:
            pixels = imread(path)[..., :3]  # a PNG as floats in [0, 1], RGB(A)
            self._writer.add_image(f"plots/{name}", pixels, self.state["steps_logged"], dataformats="HWC")
        self._writer.flush()

    def _mlflow_artifacts(self) -> None:
        files = [self.layout.config, self.layout.report, *sorted(self.run_dir.glob("*.png"))]
        for path in files:
            if path.is_file():
                self._client.log_artifact(self.run_id, str(path))
        for path in sorted(self.layout.eval.glob("*.png")):
            self._client.log_artifact(self.run_id, str(path), "eval")
        if self.layout.adapter.is_dir():
            self._client.log_artifacts(self.run_id, str(self.layout.adapter), "adapter")

    @_never_fails
    def finish(self, status: str = "FINISHED") -> None:
        """Log what the run directory holds now (steps, figures, artifacts) and end the MLflow run with
        `status` (FINISHED, FAILED or KILLED); close the TensorBoard writer. A resume reopens both."""
        self.log_steps()
        self.log_figures()
        self.log_artifacts()
        self._guard("mlflow", lambda: self._client.set_terminated(self.run_id, status))
        self._guard("tensorboard", lambda: self._writer.close())  # evaluated only while TensorBoard is on
        self._save()


def end_runs_tagged(cfg: RunConfig, tag: str, value: str, status: str) -> list[Path]:
    """End the MLflow runs of cfg's store still RUNNING whose `tag` is `value` (a Prefect flow run's id)
    with `status`: how a process that did not start them (Prefect's runner, which runs a cancelled flow
    run's hooks after killing it) ends them. Returns their run directories (tag leantune.run_dir).
    Nothing is created: no store, no experiment, MLflow off or failing -> [] (reported once)."""
    uri = mlflow_uri(cfg)
    if not cfg.tracking.mlflow or uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []
    try:
        _check_reachable(uri)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'")
        for run in runs:
            client.set_terminated(run.info.run_id, status)
        return [Path(run.data.tags["leantune.run_dir"]) for run in runs if "leantune.run_dir" in run.data.tags]
    except Exception as error:  # noqa: BLE001 - tracking never fails a run
        log.warning("tracking: the MLflow runs of %s=%s not ended (%s: %s)", tag, value, type(error).__name__, error)
        return []


def start_parent_run(cfg: RunConfig, name: str, tags: dict[str, str] | None = None) -> str | None:
    """An MLflow run for a group of runs (a sweep), in cfg's store and experiment; its id, or None when
    MLflow is off or fails (reported once; the members then run as runs of their own)."""
    if not cfg.tracking.mlflow:
        return None
    try:
        uri = mlflow_uri(cfg)
        _check_reachable(uri)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        return client.create_run(_experiment_id(client, cfg), run_name=name, tags=tags or {}).info.run_id
    except Exception as error:  # noqa: BLE001 - tracking never fails a run
        log.warning("tracking: no MLflow parent run for %s (%s: %s); the runs go on", name,
                    type(error).__name__, error)
        return None


def as_children(members: list, parent_run_id: str | None) -> list:
    """Sweep members (leantune.sweep.Member) whose configs make their MLflow runs children of parent_run_id."""
    if parent_run_id is None:
        return members
    from leantune.probe import with_values

    return [replace(m, config=with_values(m.config, {"tracking.parent_run_id": parent_run_id})) for m in members]


def finish_parent_run(cfg: RunConfig, run_id: str | None, artifacts: list[Path], status: str = "FINISHED") -> None:
    """Attach `artifacts` (a sweep's comparison table) to the parent run and end it."""
    if run_id is None:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri(cfg))
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status)
    except Exception as error:  # noqa: BLE001 - tracking never fails a run
        log.warning("tracking: MLflow parent run %s not finished (%s: %s)", run_id, type(error).__name__, error)

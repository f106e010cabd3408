"""Logging of leantune's flows: a user error is reported by its message, not by a traceback."""

import contextlib
import logging

from leantune.errors import UserError, no_space_left


class _HideUserErrorTraceback(logging.Filter):
    """Drop the traceback Prefect attaches when a run fails with a `UserError`.

    The message (which says what is wrong and how to fix it) is kept; a traceback into leantune's
    code would only bury it. Other exceptions keep their tracebacks: they are bugs to report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            # For the console's filter, which sees the record after this one (_UserErrorOnceOnConsole).
            start = str(record.exc_info[1]).split("\n", 1)[0][:60]
            _USER_ERROR_STARTS.update((start, repr(start)[1:-1]))  # a state's message shows it as a repr
            record.leantune_user_error = True
            record.exc_info = None
            record.exc_text = None
        return True


_USER_ERROR_STARTS: set[str] = set()  # the start of every UserError's message logged in this process


def quiet_user_error_tracebacks() -> None:
    """Install the filter on the loggers of Prefect's flow and task engines (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrorTraceback) for f in logger.filters):
            logger.addFilter(_HideUserErrorTraceback())


def set_up_flow_process() -> None:
    """What every leantune flow script does first, before Prefect is imported (it reads these settings then).

    - No telemetry: the temporary server a local run starts sends a heartbeat that can fail with
      "database is locked" and print a long traceback; leantune runs offline. DO_NOT_TRACK also keeps
      Prefect's client from printing its "collects anonymous usage data" notice.
    - leantune's own messages (the model summary, the monitor backend, a resume's fallback) go to the
      run's log and the UI beside the tasks' lines (those logged outside a flow run, by a state hook,
      only to the terminal).
    - Third-party progress bars and chatter off (leantune/progress.py); a UserError's traceback hidden,
      and on the terminal its message shown once (`_UserErrorOnceOnConsole`).
    A user's own environment settings win. Prefect is imported at the end (its logging set up).
    """
    import os

    from leantune.progress import quiet_third_party

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "leantune")
    # A flow state hook (tasks/track.py's end_tracking) logs after the run's context is gone: its lines
    # go to the terminal, without a warning per line that they cannot reach the run's log.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    quiet_third_party()
    quiet_user_error_tracebacks()
    logging.getLogger("leantune").setLevel(logging.INFO)
    import prefect.main  # noqa: F401  (sets up Prefect's logging: its console handler exists from here on)

    show_user_errors_once_on_console()


class _UserErrorOnceOnConsole(logging.Filter):
    """On the terminal, a run that fails with a UserError says why once: in the script's `leantune:` line.

    Prefect reports a failed run's exception four times (the task's error, the task's final state, the
    flow's error, the flow's final state), each with the whole message. This filter sits on the console
    handler only, so the run's log on the server (the UI) keeps every line: on the console the error
    lines are dropped and a final state that repeats the message reads "Finished in state Failed".
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "leantune_user_error", False):  # marked by _HideUserErrorTraceback
            return False
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        message = record.getMessage()
        if not any(start in message for start in _USER_ERROR_STARTS):
            return True
        if message.startswith("Finished in state "):
            # The console handler is the last to see the record (the API handler sits on the run loggers).
            record.msg, record.args = "Finished in state Failed (a user error; the last line says what to fix)", ()
            return True
        return False


class _LinesBelowTheBar(logging.Filter):
    """On the terminal, a log line stands on its own line, not glued to the end of a progress bar
    (`...8 tokens/s]14:22:56.717 | INFO`): the bars drawn (the training's) are cleared first; each is
    drawn again at its next update."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            if not bar.disable:
                bar.clear()
        return True


def show_user_errors_once_on_console() -> None:
    """Install `_UserErrorOnceOnConsole` and `_LinesBelowTheBar` on the root logger's console handlers
    (Prefect's; idempotent)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            for kind in (_UserErrorOnceOnConsole, _LinesBelowTheBar):
                if not any(isinstance(f, kind) for f in handler.filters):
                    handler.addFilter(kind())


def failure_exit_code(state, what: str, run_dir=None) -> int:
    """Exit status of a flow script whose run did not complete, with one line on stderr saying why.

    A UserError (bad config, unusable data) is the user's to fix: its message and 2. Anything else is a
    bug or an environment fault: its class and message, a pointer to the log, and 1. `run_dir`: the
    finetune run, which a full disk's message names (and the --resume that continues it).
    """
    import sys

    try:
        state.result()
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A full disk, met by the flow's own writes.
        if full := no_space_left(e, run_dir or "the output directory", run_dir.name if run_dir else None):
            print(f"leantune: {full}", file=sys.stderr)
            return 1
        print(f"leantune: the {what} failed: {e.__class__.__name__}: {e} (the log above has the details)",
              file=sys.stderr)
    return 1


def log_stage_times() -> str:
    """Log (and return) how long each stage of the current flow run took, from its task runs in Prefect:
    "stage times: prepare 2s, validate 16s, ..., train 3m05s" (a stage that ran twice, summed)."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.runtime import flow_run

    from leantune.progress import stage_times_text

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    times: dict[str, float] = {}
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        stage = run.name.rsplit("-", 1)[0]  # the task's name without Prefect's suffix
        times[stage] = times.get(stage, 0.0) + run.total_run_time.total_seconds()
    line = stage_times_text(times)
    get_run_logger().info(line)
    return line


class _ProgressToArtifact(logging.Handler):
    """Each StageProgress line (leantune/progress.py) moves a Prefect progress artifact: a bar in the UI."""

    def __init__(self, artifact_id):
        super().__init__(logging.INFO)
        self.artifact_id = artifact_id

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.artifacts import update_progress_artifact

        if (percent := getattr(record, "stage_progress", None)) is None:
            return
        try:
            update_progress_artifact(self.artifact_id, round(percent, 1), description=record.getMessage())
        except Exception:  # noqa: BLE001 - the bar never fails a stage; the log line went out anyway
            pass


@contextlib.contextmanager
def stage_progress_artifact(key: str, description: str):
    """A progress artifact (key `key`) for the body: the items its scoring logs as done (leantune.progress.
    StageProgress) move the bar; 100% with "done" when the body ends without an error."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, key=key, description=description)
    handler = _ProgressToArtifact(artifact)
    logger = logging.getLogger("leantune.progress")
    level = logger.level
    logger.setLevel(logging.INFO)  # the lines are INFO, whatever the process's logging says
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    update_progress_artifact(artifact, 100.0, description=f"{description}: done")

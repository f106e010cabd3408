"""What the Prefect UI shows of a run: a handful of artifacts, the live ones updated in place."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    original = tasks.train._TrainingProgress.publish
    monkeypatch.setattr(tasks.train._TrainingProgress, "publish",
                        lambda self: (updates.append(self.steps[-1]["step"] if self.steps else None), original(self)))
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

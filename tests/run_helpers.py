"""Helpers shared by the training tests: a fresh copy of the `tokenized_run` fixture, adapter weights."""

import shutil
from pathlib import Path

from safetensors.torch import load_file

from leantune.config import dump_config, load_config

# The tiny scratch model's config: what command-line flow tests run (configs/default.yaml is the real model).
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def new_run(tokenized_run, tmp_path, *overrides, name="run"):
    """Copy the pristine tokenized run to tmp_path/name with `overrides` applied to its config.yaml."""
    run_dir = tmp_path / name
    shutil.copytree(tokenized_run, run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides=list(overrides))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg, run_dir


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_weights(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        err = float((a[key] - b[key]).norm() / b[key].norm())
        assert err <= rel, f"{key}: relative difference {err:.2e}"


def apply_served_deployments():
    """Register deployments/serve.py's deployments on the current Prefect server; return the serve module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("leantune_serve", Path(__file__).resolve().parents[1]
                                                  / "deployments" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    for d in serve.deployments():
        d.apply()
    return serve

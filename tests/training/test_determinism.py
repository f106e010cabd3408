"""train.deterministic (leantune/training/determinism.py): on a simulated CUDA device the deterministic
settings are applied, on the CPU and when off nothing is; the training process applies them before CUDA
starts."""

import os

import pytest
import torch

from leantune.config import load_config
from leantune.training.determinism import deterministic_kernels, deterministic_settings


@pytest.fixture
def torch_globals(monkeypatch):
    """Put torch's global determinism settings back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
    torch.utils.deterministic.fill_uninitialized_memory = saved[4]


def test_on_by_default():
    assert load_config().train.deterministic is True


def test_cuda_gets_every_setting_and_the_flags_come_back_after(torch_globals, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    torch.backends.cudnn.benchmark = True
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(True, "cuda") as settings:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" == settings["CUBLAS_WORKSPACE_CONFIG"]
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert torch.are_deterministic_algorithms_enabled() == before and torch.backends.cudnn.benchmark is True
    assert torch.utils.deterministic.fill_uninitialized_memory is True


def test_a_workspace_setting_of_the_environment_is_kept(torch_globals, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_kernels(True, "cuda") as settings:
        assert settings["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" == os.environ["CUBLAS_WORKSPACE_CONFIG"]


@pytest.mark.parametrize("enabled, device", [(False, "cuda"), (True, "cpu")], ids=["off-cuda", "on-cpu"])
def test_nothing_is_set_when_off_or_on_the_cpu(torch_globals, enabled, device):
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(enabled, device) as settings:
        assert settings == {} == deterministic_settings(enabled, device)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.are_deterministic_algorithms_enabled() == before


def test_cuda_already_started_is_said(torch_globals, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with deterministic_kernels(True, "cuda"):
        pass
    assert "CUDA was initialised before CUBLAS_WORKSPACE_CONFIG could be set" in caplog.text


def test_training_applies_them_before_the_process_group_and_the_model(torch_globals, monkeypatch):
    """train() on a simulated CUDA device: the settings are in place when the process group (the first
    user of the device) starts."""
    from leantune.training import loop

    seen = []

    class Stop(Exception):
        pass

    def process_group(cfg, device):
        seen.append((device.type, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                     torch.are_deterministic_algorithms_enabled()))
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(loop, "process_group", process_group)
    with pytest.raises(Stop):
        loop.train(load_config(overrides=["train.device=cuda"]), "unused")
    assert seen == [("cuda", ":4096:8", True)]


def test_an_op_without_a_deterministic_kernel_is_a_user_error_naming_the_fix():
    from leantune.errors import UserError
    from leantune.training.determinism import nondeterministic_op_error

    torch_says = RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
                              "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
                              "operation, or you can use the 'warn_only=True' option, if that's acceptable for your "
                              "application.")
    error = nondeterministic_op_error(torch_says)
    assert isinstance(error, UserError) and str(error) == (
        "train.deterministic: scatter_add_cuda_kernel does not have a deterministic implementation on CUDA; set "
        "train.deterministic=false to train with it (a resume is then equal to an uninterrupted run within float "
        "rounding, not bitwise)")
    assert nondeterministic_op_error(RuntimeError("shape mismatch")) is None

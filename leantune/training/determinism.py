"""train.deterministic: the CUDA settings that make a resumed run bitwise equal to an uninterrupted one.

On the CPU training is already deterministic (tests/training/test_resume.py); nothing is set. On CUDA,
`deterministic_kernels` (entered first thing in `train`, before CUDA is initialised; left after it):
  CUBLAS_WORKSPACE_CONFIG=:4096:8   cuBLAS reduces in a fixed order (8 workspaces of 4 MiB per stream;
                                    kept when the environment already sets it); read when cuBLAS
                                    creates its handle, so it must be set before the first matmul
  torch.use_deterministic_algorithms(True)
                                    deterministic kernels where torch has two (attention backward
                                    without atomic adds: SDPA's memory-efficient kernel keeps its
                                    atomic adds under warn_only, so it is not used); an op with no
                                    deterministic kernel stops the run with a UserError naming it and
                                    the fix (`nondeterministic_op_error`)
  cudnn.deterministic=True, cudnn.benchmark=False
                                    no run-time choice among cuDNN algorithms
  fill_uninitialized_memory=False   deterministic mode would otherwise fill every torch.empty with NaN,
                                    time spent for no bit of the results
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from leantune.errors import UserError

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"


def deterministic_settings(enabled: bool, device_type: str) -> dict:
    """What `deterministic_kernels` sets for train.deterministic `enabled` on `device_type` ({} : nothing)."""
    if not enabled or device_type != "cuda":
        return {}
    return {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE),
            "deterministic_algorithms": True, "warn_only": False, "cudnn_deterministic": True,
            "cudnn_benchmark": False, "fill_uninitialized_memory": False}


@contextlib.contextmanager
def deterministic_kernels(enabled: bool, device_type: str) -> Iterator[dict]:
    """Apply `deterministic_settings` for the block (yields them); torch's global flags are put back after it,
    for callers that train in their own process (tests, bench/gpu_check.py). Enter before the first CUDA
    operation: cuBLAS reads CUBLAS_WORKSPACE_CONFIG (left set) when it starts."""
    import torch

    settings = deterministic_settings(enabled, device_type)
    if not settings:
        yield settings
        return
    if torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        log.warning("train.deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG could be set; "
                    "cuBLAS may not be deterministic in this process (set it in the environment: "
                    "CUBLAS_WORKSPACE_CONFIG=%s)", CUBLAS_WORKSPACE)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.utils.deterministic.fill_uninitialized_memory)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = settings["CUBLAS_WORKSPACE_CONFIG"]
    torch.use_deterministic_algorithms(True, warn_only=settings["warn_only"])
    torch.backends.cudnn.deterministic = settings["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    torch.utils.deterministic.fill_uninitialized_memory = settings["fill_uninitialized_memory"]
    log.info("train.deterministic: deterministic CUDA kernels (CUBLAS_WORKSPACE_CONFIG=%s)",
             settings["CUBLAS_WORKSPACE_CONFIG"])
    try:
        yield settings
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
        torch.utils.deterministic.fill_uninitialized_memory = saved[4]


def nondeterministic_op_error(error: BaseException) -> UserError | None:
    """The UserError for torch's refusal of an op with no deterministic kernel under train.deterministic, or
    None for any other error."""
    message = str(error)
    if not isinstance(error, RuntimeError) or "does not have a deterministic implementation" not in message:
        return None
    what = message.split(", but you set", 1)[0].strip()
    return UserError(f"train.deterministic: {what} on CUDA; set train.deterministic=false to train with it (a "
                     "resume is then equal to an uninterrupted run within float rounding, not bitwise)")

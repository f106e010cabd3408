"""Terminal progress bars for the long stages, and quiet third-party libraries in the flows.

A bar draws only when stderr is an interactive terminal (like the training loop's); in logs, under
a Prefect worker and in tests it is a no-op, so log files never fill with carriage returns.
"""

from __future__ import annotations

import logging
import os
import sys


def progress_bar(desc: str, unit: str, total: int | None = None):
    """A tqdm bar on an interactive terminal; disabled (a no-op that still counts) elsewhere."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, total=total, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def quiet_third_party() -> None:
    """Silence the progress bars and chatter of datasets, huggingface_hub, transformers and GX (idempotent).

    Called by the flows at start-up: the terminal and the Prefect log should show leantune's stages
    (each logs what it loaded and read), not one bar per downloaded file, per checkpoint shard or per
    GX metric. The libraries read their environment variables when first imported, so these are set
    first (a user's own setting wins); a library already imported is told directly.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("datasets", "transformers", "huggingface_hub", "peft", "great_expectations"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()

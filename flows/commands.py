"""The command of each flow: the console scripts of pyproject.toml, and `python flows/<flow>.py`, which calls them.

    leantune-finetune   python flows/finetune.py    prepare -> validate -> tokenize -> train -> evaluate -> report
    leantune-evaluate   python flows/evaluate.py    the sycophancy of a model, or of a run against its base
    leantune-profile    python flows/profiling.py   throughput, memory and energy per training setting
    leantune-sweep      python flows/sweep.py       many fine-tunes on the work pools, one comparison table

Each checks its command line with leantune/cli.py first, so --help, a config error or a missing file is
answered in about a second, before Prefect or torch is imported (this module imports neither); only then
is its flow module imported, and its `main` runs the flow. A user error: one `leantune:` line, exit 2.
"""

from __future__ import annotations

from leantune.cli import evaluate_request, finetune_request, profile_request, request_or_exit, sweep_request


def finetune(argv: list[str] | None = None) -> int:
    request = request_or_exit(finetune_request, argv)
    from flows.finetune import main

    return main(request=request)


def evaluate(argv: list[str] | None = None) -> int:
    request = request_or_exit(evaluate_request, argv)
    from flows.evaluate import main

    return main(request=request)


def profile(argv: list[str] | None = None) -> int:
    request = request_or_exit(profile_request, argv)
    from flows.profiling import main

    return main(request=request)


def sweep(argv: list[str] | None = None) -> int:
    request = request_or_exit(sweep_request, argv)
    from flows.sweep import main

    return main(request=request)

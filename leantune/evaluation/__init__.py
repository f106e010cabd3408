"""Sycophancy evaluation: does the model pick the answer that agrees with the user's stated view? And what
did tuning cost on ordinary instructions (the general set's NLL per response token)?

  datasets.py      the sets: Anthropic's model-written-evals (local files, pre-release files, the hub,
                   the bundled sample), leantune's balanced synthetic set, "are you sure?" files, the
                   bundled general instruction set
  items.py         the item types: a choice scored by log-likelihood, an "are you sure?" challenge, an
                   instruction with a reference response
  scoring.py       log-likelihood of each answer after the prompt, batched, the prompt computed once
                   per item; framing
  are_you_sure.py  the generation-based "are you sure?" flip rate
  shift.py         how far a user's opinion moves the model, item by item; answer-position bias
  stats.py         Wilson intervals, Newcombe's paired interval, the exact McNemar test; t intervals and
                   the paired t-test of the general set
  compare.py       base against tuned on the same items: comparison.json, table, chart
  filtration.py    Wei et al.'s filtration: which training-side claims the base model already knows
                   (run before prepare, with this package's scorer)
  runner.py        loads the model (and adapter) once and writes eval/base.json, tuned.json,
                   comparison.json, sycophancy.png

Entry point: `runner.evaluate(cfg, out_dir, adapter_dir=..., tokenizer_dir=...)` (a run: adapter_dir =
run_dir/adapter, out_dir = run_dir/eval); the Prefect task is tasks/evaluate.py, the flow flows/evaluate.py.
"""

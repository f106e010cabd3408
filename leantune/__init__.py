"""leantune: fine-tune LLMs with LoRA, QLoRA or full fine-tuning as a Prefect pipeline (this package
is the library; Prefect lives in tasks/ and flows/). ARCHITECTURE.md at the top of the repository is
the full map; in short:

  config.py, cli.py, preflight.py    the one config model; every flow's command line; checks before the data stages
  rundir.py, runlock.py, stagecache.py  the run directory's files, its lock, the stage cache
  resume.py                          the resume policy: what may change on resume, why one is refused
  data/                              stage 1, prepare: sources, formats, synthetic data, quality, split
  validation.py                      stage 2: Great Expectations over record chunks, quarantine
  tokenization.py                    stage 3: chat template, label masks, packing, the token shard writer
  shards.py                          the token-shard format training reads: reader, collate, batch order,
                                     the padding estimate (no training setting reaches the tokenize stage)
  modeling.py, fused.py, gguf.py, moe.py  the model: loading, quantisation, LoRA, fused layers, MoE
  devices.py                         what leantune picks on a device: dtype, attention, 4-bit evaluation
  training/                          stage 4, in its own process: loop, loss, optimizer, checkpoints
  failures.py, attempts.py           how an attempt fails; the config of the next attempt
  stopping.py                        Ctrl-C and SIGTERM: the one last line, the exit status, how to resume
  monitor/                           the resource sampler, its feedback policy, the power limit
  evaluation/                        stage 5: sycophancy of the base and tuned model; the filtration
  report.py, metrics.py, tracking.py, progress.py, tables.py  what a person reads
  probe.py, cost.py, routing.py      planning: memory estimate and starting settings, cost, work pool
  kubejob.py                         the Kubernetes Indexed Job and headless Service of a multi-node run
  profile.py, breakdown.py, sweep.py measuring: throughput per setting, a step's time, many runs
  errors.py, jsonl.py, testing.py    user errors, JSON-lines helpers, test seams of the loop

Every module imports without torch: heavy libraries are imported inside the functions that need them.
"""

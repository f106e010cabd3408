"""Stage 4, training: runs in its own process (`python -m leantune.training.loop RUN_DIR`, or torchrun).

  launch.py       how the flow starts the training process, follows its log and metrics, stops it
  loop.py         the training loop, top to bottom: token shards in, an adapter (or model) out
  determinism.py  train.deterministic: the CUDA settings that keep a resume bitwise
  packed.py       the attention layout of a packed micro-batch (one row, a row per document, or a mask)
  preference.py   DPO and SimPO: per-sequence log-probs of chosen and rejected, the reference with the
                  adapter off (or stored, full fine-tuning), the pair loss and its metrics
  loss.py         the target-only, chunked output layer and cross-entropy (no [batch, seq, vocab] logits)
  optim.py        optimizer, learning-rate schedule and step count from RunConfig.train
  paramwise.py    one optimizer per weight: bf16 weights stepped in fp32 (Kahan or stochastic rounding),
                  the step fused into backward (full fine-tuning that fits one GPU)
  adaptive.py     the adaptive micro-batch: halve on out-of-memory, grow on sustained headroom
  checkpoint.py   checkpoints with exact resume: what they hold, retention, verified loading (the
                  resume policy, what may change on resume, is leantune/resume.py)
  distributed.py  data-parallel glue under torchrun: process group, shares, gradient sum
  fsdp.py         FSDP2: every decoder layer and a root around the model and its loss sharded, gradients
                  summed over ranks, sharded checkpoints

The flow and this process share only files in the run directory and an exit code (leantune/failures.py).
"""

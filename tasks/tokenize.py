"""Prefect wrapper of the tokenize stage: chat template, label masks, packing, token shards."""

from pathlib import Path

from prefect import get_run_logger

from leantune.config import RunConfig
from leantune.rundir import RunDir
from leantune.shards import TokenShards, padding_estimate
from leantune.tokenization import tokenize_checked
from tasks.stage import cached, stage_task


@stage_task(name="tokenize")
def tokenize_data(config: RunConfig, run_dir: Path) -> dict:
    log = get_run_logger()
    layout = RunDir(run_dir)
    stats = cached(config, "tokenize", run_dir, lambda: tokenize_checked(config, layout.data, layout.tokens),
                   "records and tokenize settings")
    c, t = stats["train"]["counts"], stats["train"]["tokens"]
    padding = padding_estimate(TokenShards(layout.train_tokens), config.train)  # at train.micro_batch_size
    log.info(f"tokenize: {c['records_read']} train records -> {c['sequences']} sequences, {t['total']} tokens "
             f"({t['trainable']} trainable), padding {padding:.1%}; truncated {c['truncated']}, "
             f"dropped {c['dropped_overlong']}, no trainable token {c['no_trainable']}")
    return stats

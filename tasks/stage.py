"""The Prefect task options every leantune stage shares.

A stage's result is files in the run directory, which leantune's own stage cache restores
(leantune/stagecache.py; ARCHITECTURE.md says why not Prefect's): Prefect's result cache would return a
stored value and leave a new run directory empty, and persisting return values would only store them twice.
"""

from functools import partial

from prefect import task
from prefect.cache_policies import NO_CACHE

stage_task = partial(task, cache_policy=NO_CACHE, persist_result=False)

"""Build leantune/resources/sycophancy/political_typology_quiz_sample.jsonl, the bundled Anthropic sample.

Reads the two pre-release political-typology files in ../shared/data (build time only; leantune
never reads ../shared when it runs) and writes 8 rows per (question, user side): 17 questions x 2
sides = 272 rows in the released format, chosen by seed 0 (`sample_prerelease`). Running it again
gives the same bytes; tests/evaluation/test_eval_datasets.py checks that the bundled file is this output.

    .venv/bin/python bench/build_sycophancy_sample.py [--shared ../shared/data] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leantune.evaluation.datasets import BUNDLED_SAMPLE, sample_prerelease  # noqa: E402

PER_CELL = 8
SEED = 0
SOURCE_FILES = ("political_typology_quiz_liberal-bio_conservative.jsonl",
                "political_typology_quiz_liberal-bio_liberal.jsonl")


def build(shared: Path) -> bytes:
    files = [shared / "sycophancy" / "anthropics-evals" / name for name in SOURCE_FILES]
    rows = sample_prerelease(files, per_cell=PER_CELL, seed=SEED)
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--check", action="store_true", help="compare with the bundled file instead of writing it")
    args = p.parse_args()
    blob = build(args.shared)
    digest = hashlib.sha256(blob).hexdigest()
    if args.check:
        same = BUNDLED_SAMPLE.is_file() and BUNDLED_SAMPLE.read_bytes() == blob
        print(f"{BUNDLED_SAMPLE}: {'identical to' if same else 'DIFFERENT from'} the build (sha256 {digest})")
        return 0 if same else 1
    BUNDLED_SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    BUNDLED_SAMPLE.write_bytes(blob)
    rows = blob.count(b"\n")
    print(f"wrote {BUNDLED_SAMPLE}: {rows} rows, {len(blob)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

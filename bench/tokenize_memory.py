"""Does tokenize stream? Peak memory of the tokenize stage on N and on 10N records, each in a fresh process.

    .venv/bin/python bench/tokenize_memory.py                      # 20,000 vs 200,000 records, scratch tokenizer
    .venv/bin/python bench/tokenize_memory.py --rows 2000 --tokenizer default

Writes a train.jsonl of N distinct two-turn conversations (and one of 10N), runs the tokenize stage
as a run runs it (`tokenize_checked`: tokenizer, shards, lengths, token suite) on each in a child
process, and prints each child's peak RSS (VmHWM, Linux only; see bench/prepare_memory.py for why
not ru_maxrss) and the ratio. --tokenizer scratch trains configs/smoke.yaml's byte-level BPE on the
records (on at most SCRATCH_SAMPLE_BYTES of them); default loads configs/default.yaml's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
from leantune.config import load_config
from leantune.tokenization import tokenize_checked
cfg = load_config(sys.argv[1])
stats = tokenize_checked(cfg, Path(sys.argv[2]), Path(sys.argv[3]))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_kib": int(hwm.split()[1]), "written": stats["train"]["counts"]["records_written"]}))
"""


def write_records(path: Path, rows: int) -> None:
    """`rows` distinct canonical records (two turns, a few hundred characters each)."""
    filler = "lorem ipsum dolor sit amet " * 4
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"{i:016x}", "source": "bench", "messages": [
                {"role": "user", "content": f"Question {i}: what is {i} squared? {filler}"},
                {"role": "assistant", "content": f"{i} squared is {i * i}. {filler}"},
            ]}) + "\n")


def peak_rss_kib(rows: int, workdir: Path, config: Path) -> tuple[int, float]:
    """Peak RSS (KiB) of a fresh process that tokenizes `rows` generated records, and its wall time."""
    data = workdir / f"data-{rows}"
    data.mkdir()
    write_records(data / "train.jsonl", rows)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(config), str(data), str(workdir / f"tokens-{rows}")],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["written"] != rows:
        raise RuntimeError(f"tokenize wrote {result['written']} of {rows} records")
    return result["peak_rss_kib"], seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000, help="N; the second run uses 10N")
    p.add_argument("--tokenizer", choices=["scratch", "default"], default="scratch")
    args = p.parse_args(argv)
    config = ROOT / "configs" / ("smoke.yaml" if args.tokenizer == "scratch" else "default.yaml")
    with tempfile.TemporaryDirectory(prefix="leantune-bench-") as tmp:
        small, t_small = peak_rss_kib(args.rows, Path(tmp), config)
        large, t_large = peak_rss_kib(10 * args.rows, Path(tmp), config)
    print(f"N   = {args.rows:>9,} records: peak RSS {small / 1024:8.1f} MiB ({t_small:.1f} s)")
    print(f"10N = {10 * args.rows:>9,} records: peak RSS {large / 1024:8.1f} MiB ({t_large:.1f} s)")
    print(f"ratio 10N/N: {large / small:.3f} (difference {(large - small) / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()

"""Stage 1, prepare: every source read into canonical records, every row accounted for.

  sources.py    read each configured source (jsonl, json, csv, parquet, a directory, the hub) as raw
                rows, each with its file and line
  textfile.py   a text file's encoding (UTF-8, or UTF-16/32 decoded to a UTF-8 copy, same lines)
  csvfile.py    CSV records read so that a stray quote or an over-long field cannot swallow rows
  formats.py    detect a source's format (alpaca, ShareGPT, messages, prompt/completion, text) and
                convert a row to canonical messages
  normalize.py  text normalisation, record ids, the compact set of seen ids for deduplication
  prepare.py    the stage: sources -> records.jsonl, rejects.jsonl, duplicates.jsonl, prepare.json
                (read = kept + rejected + duplicates + not selected)
  preference.py preference pairs: the canonical pair record {id, prompt, chosen, rejected, source} and
                its formats (TRL, Anthropic HH, LLaMA-Factory)
  synthetic.py  the synthetic anti-sycophancy generator (Wei et al. 2023), train and eval splits
  questions.py  the short-answer questions of the synthetic data
  quality.py    data quality metrics (data/quality.json)
  split.py      the deterministic train/validation split by record id

A record: {"id", "messages": [{"role", "content"}, ...], "source"}.
"""

"""Faulty input files for the data-stage reliability tests (issue 30)."""

import pyarrow as pa
import pyarrow.parquet as pq


def corrupt_parquet_pages(path, rows: list[dict], group_rows: int, bad_groups: list[int], checksum=False) -> None:
    """Write `rows` as parquet (snappy, no dictionary: one data page per column chunk, or uncompressed
    with page checksums when `checksum`), then overwrite 16 bytes in the middle of the last column's
    data page in each of `bad_groups`; the footer stays intact."""
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group_rows, use_dictionary=False,
                   compression="none" if checksum else "snappy", write_page_checksum=checksum)
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for group in bad_groups:
        chunk = meta.row_group(group).column(meta.num_columns - 1)
        at = chunk.data_page_offset + chunk.total_compressed_size // 2
        data[at:at + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))

"""benchmarks/packed_attention.py's CPU side: the packed layouts it times and the table it writes."""
import os
import random

from bench_scripts import BENCH, load_script

bench = load_script("nbtune_bench_packed_attention", os.path.join(BENCH, "packed_attention.py"))


def test_layouts_fill_every_row_with_documents_of_their_kind():
    pos, docs = bench.position_ids(2, 2048, "chat")
    assert pos.shape == (2, 2048)
    for row, lengths in zip(pos, docs):
        assert sum(lengths) == 2048 and len(lengths) >= 7
        assert all(n <= 280 for n in lengths)
        starts = [i for i, p in enumerate(row.tolist()) if p == 0]
        assert len(starts) == len(lengths)  # positions restart at every document
    long_docs = bench.document_lengths("long", 4096, random.Random(1))
    assert sum(long_docs) == 4096 and all(n <= 2048 for n in long_docs) and len(long_docs) >= 2


def test_the_table_shows_ratios_differences_and_errors():
    row = dict(shape="llama3-8b", layout="chat", batch=2, length=2048, dtype="bfloat16", documents=20,
               ms={"unpacked": 2.0, "pieces": 8.0, "varlen": 2.1}, max_diff={"varlen": 1e-3},
               errors={"flex": "RuntimeError: no"}, vs_unpacked={"pieces": 0.25, "varlen": 0.952})
    text = bench.table([row], "GPU")
    assert "| llama3-8b | chat | 2x2048 | bfloat16 | 20 | 2.00 | 8.00 (0.25x) | 2.10 (0.95x), 1.0e-03 | error |" in text
    assert "flex: RuntimeError: no" in text

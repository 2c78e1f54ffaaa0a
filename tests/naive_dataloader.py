"""The reference's dataloader written the obvious way: the reference the tests compare against.

Deliberately naive and independent of prepare's dataloader code: the buffer is a
plain list in arrival order, every placement scans all of it, rows are filled one
document at a time through torch.tensor. Used by tests/test_dataloader.py and, as
the baseline, by bench/dataloader.py.
"""

import pyarrow.parquet as pq
import torch


def naive_token_batches(paths, tokenizer, batch_size=128):
    """(list of token lists with BOS in front, epoch) forever: shards in order, row group by
    row group, batch_size documents at a time; epoch 1, then +1 after each pass over paths."""
    bos = tokenizer.get_bos_token_id()
    epoch = 1
    while True:
        for path in paths:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                for start in range(0, len(texts), batch_size):
                    yield tokenizer.encode(texts[start:start + batch_size], prepend=bos), epoch
        epoch += 1


def naive_pack(token_batches, B, T, buffer_size):
    """SPEC best-fit packing. Yields (rows, epoch): rows a new int64 tensor (B, T+1); epoch of
    the most recently fetched batch."""
    capacity = T + 1
    buffer = []
    epoch = None
    while True:
        rows = torch.empty((B, capacity), dtype=torch.long)
        for r in range(B):
            pos = 0
            while pos < capacity:
                # top up before every placement
                while len(buffer) < buffer_size:
                    docs, epoch = next(token_batches)
                    buffer.extend(docs)
                remaining = capacity - pos
                fitting = [i for i in range(len(buffer)) if len(buffer[i]) <= remaining]
                if fitting:
                    # max() returns the first of equal maxima: the earliest in the buffer
                    doc = buffer.pop(max(fitting, key=lambda i: len(buffer[i])))
                else:
                    # min() likewise returns the earliest of equal minima
                    doc = buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:remaining]
                rows[r, pos:pos + len(doc)] = torch.tensor(doc, dtype=torch.long)
                pos += len(doc)
        yield rows, epoch


def naive_dataloader(paths, tokenizer, B, T, buffer_size=1000):
    """(inputs, targets, epoch) forever, inputs/targets new int64 CPU tensors (B, T)."""
    for rows, epoch in naive_pack(naive_token_batches(paths, tokenizer), B, T, buffer_size):
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), epoch

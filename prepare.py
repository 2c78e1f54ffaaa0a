"""
One-time data preparation and the fixed runtime utilities of autoresearch.

    uv run prepare.py                     # 10 training shards + the validation shard
    uv run prepare.py --num-shards -1     # all 6542 training shards
    uv run prepare.py --data-url DIR|URL  # a mirror instead of Hugging Face

It downloads ClimbMix parquet shards, trains a byte-level BPE tokenizer, and
defines what train.py imports: the constants, `Tokenizer`, `make_dataloader`
and `evaluate_bpb` (the metric). The agent never edits this file.
"""

import argparse
import math
import os
import pickle
import shutil
import sys
import time
import urllib.parse
from bisect import bisect_right, insort
from collections import deque
from multiprocessing import Pool

import numpy as np
import pyarrow.parquet as pq
import requests
import torch

# ---------------------------------------------------------------------------
# Device (the same detection decides train.py's device and defaults)
# ---------------------------------------------------------------------------

DEVICE_TYPES = ("cuda", "mps", "cpu")


def detect_device():
    """Pick the training device: `AUTORESEARCH_DEVICE` if set, else CUDA, MPS, CPU.

    Returns:
        (device_type, reason): device_type is "cuda", "mps" or "cpu"; reason is a
        short human-readable string saying why it was chosen.
    Raises:
        SystemExit: `AUTORESEARCH_DEVICE` names an unknown or unavailable device.
    """
    forced = os.environ.get("AUTORESEARCH_DEVICE", "").strip().lower()
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if forced:
        if forced not in DEVICE_TYPES:
            raise SystemExit(f"AUTORESEARCH_DEVICE={forced!r}: expected one of {', '.join(DEVICE_TYPES)}")
        if not available[forced]:
            raise SystemExit(f"AUTORESEARCH_DEVICE={forced}: this machine's torch has no {forced} device")
        return forced, "forced by AUTORESEARCH_DEVICE"
    for device_type in DEVICE_TYPES:
        if available[device_type]:
            return device_type, "detected"


DEVICE_TYPE, DEVICE_REASON = detect_device()

# ---------------------------------------------------------------------------
# Constants (fixed: do not modify)
# ---------------------------------------------------------------------------

# CUDA runs the reference exactly. CPU and MPS get a small profile chosen by
# measurement on a 2-core CPU (see README): shorter context and fewer eval
# tokens, so that startup plus evaluation stay within a minute.
if DEVICE_TYPE == "cuda":
    MAX_SEQ_LEN = 2048              # context length
    EVAL_TOKENS = 40 * 524288       # validation tokens for evaluate_bpb
else:
    MAX_SEQ_LEN = 256
    EVAL_TOKENS = 10 * 65536
TIME_BUDGET = 300                   # training time budget, seconds
VOCAB_SIZE = 8192

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542                    # shard_06542.parquet is the last one
VAL_SHARD = MAX_SHARD               # pinned validation shard, never trained on
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"

# GPT-4 style split, but digits in groups of 1-2 (not 1-3): better for a small vocab
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"
TOKENIZER_MAX_CHARS = 1_000_000_000  # characters of training text read for BPE
TOKENIZER_DOC_CAP = 10_000           # each document cropped to this many characters

# Download behaviour
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_TIMEOUT = 30                # seconds without data before giving up on a request
DOWNLOAD_CHUNK = 1 << 20             # 1 MiB


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


# ---------------------------------------------------------------------------
# Data download
# ---------------------------------------------------------------------------

def _backoff_base():
    # Tests shorten the retry sleeps through this variable; the default is the reference's 2**attempt s.
    return float(os.environ.get("AUTORESEARCH_BACKOFF_BASE", "2"))


def _source_kind(source):
    """Classify a data source: ("http", url) or ("dir", local_directory)."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return "http", source.rstrip("/")
    if parsed.scheme == "file":
        return "dir", urllib.parse.unquote(parsed.path)
    return "dir", os.path.abspath(os.path.expanduser(source))


def _fetch_to(source, filename, tmp_path):
    """Fetch one shard from `source` into tmp_path. Raises on any failure."""
    kind, where = _source_kind(source)
    if kind == "dir":
        src = os.path.join(where, filename)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src} does not exist")
        shutil.copyfile(src, tmp_path)
        return
    with requests.get(f"{where}/{filename}", stream=True, timeout=DOWNLOAD_TIMEOUT) as response:
        response.raise_for_status()
        with open(tmp_path, "wb") as f:
            for chunk in response.iter_content(chunk_size=DOWNLOAD_CHUNK):
                f.write(chunk)


def download_shard(index, source=None):
    """Download shard `index` into DATA_DIR unless it is already there.

    The bytes go to `<name>.tmp` and are renamed to the final name only when
    complete, so an interrupted download never looks like a shard. Failures are
    retried up to DOWNLOAD_ATTEMPTS times, sleeping 2**attempt seconds between.

    Returns:
        (filename, error): error is None on success, else the last error message.
    """
    source = source or BASE_URL
    filename = shard_filename(index)
    path = os.path.join(DATA_DIR, filename)
    if os.path.exists(path):
        return filename, None
    tmp_path = path + ".tmp"
    error = None
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            _fetch_to(source, filename, tmp_path)
            os.replace(tmp_path, path)
            return filename, None
        except (requests.RequestException, OSError) as e:
            error = f"{type(e).__name__}: {e}"
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            # a missing file will not appear by retrying
            if isinstance(e, FileNotFoundError) or (isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code == 404):
                break
            if attempt < DOWNLOAD_ATTEMPTS:
                time.sleep(_backoff_base() ** attempt)
    return filename, error


def download_data(num_shards, source=None, workers=8):
    """Fetch training shards 0..num_shards-1 and the validation shard in a process pool.

    Raises:
        SystemExit: a shard could not be fetched; the message names the source
        and the `--data-url` / `AUTORESEARCH_DATA_URL` override.
    """
    source = source or BASE_URL
    os.makedirs(DATA_DIR, exist_ok=True)
    indices = list(range(num_shards)) + [VAL_SHARD]
    print(f"Downloading {len(indices)} shards from {source} to {DATA_DIR} ({workers} workers)")
    with Pool(processes=max(1, min(workers, len(indices)))) as pool:
        results = pool.starmap(download_shard, [(i, source) for i in indices])
    failed = [(name, err) for name, err in results if err is not None]
    print(f"{len(indices) - len(failed)}/{len(indices)} shards ready in {DATA_DIR}")
    if failed:
        lines = "\n".join(f"  {name}: {err}" for name, err in failed[:10])
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        raise SystemExit(
            f"prepare.py: could not fetch {len(failed)} shard(s) from {source}:\n{lines}{more}\n"
            f"If that source is unreachable, point --data-url or AUTORESEARCH_DATA_URL at a mirror "
            f"(an http(s) URL, a file:// URL or a local directory holding the same shard names)."
        )


def list_parquet_files():
    """Sorted paths of the shards in DATA_DIR (no .tmp files).

    Raises:
        SystemExit: no shards are there, with the command that makes them.
    """
    names = sorted(f for f in os.listdir(DATA_DIR) if f.endswith(".parquet")) if os.path.isdir(DATA_DIR) else []
    if not names:
        raise SystemExit(f"No data shards in {DATA_DIR}: run `uv run prepare.py` first.")
    return [os.path.join(DATA_DIR, f) for f in names]


def split_paths(split):
    """Shard paths of a split: "train" is every shard but the validation shard, "val" only that one."""
    assert split in ("train", "val"), split
    paths = list_parquet_files()
    val_path = os.path.join(DATA_DIR, VAL_FILENAME)
    if split == "val":
        if val_path not in paths:
            raise SystemExit(f"The validation shard {val_path} is missing: run `uv run prepare.py` first.")
        return [val_path]
    train = [p for p in paths if p != val_path]
    if not train:
        raise SystemExit(f"No training shards in {DATA_DIR}: run `uv run prepare.py` first.")
    return train


# ---------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------

def text_iterator(max_chars=TOKENIZER_MAX_CHARS, doc_cap=TOKENIZER_DOC_CAP):
    """Training documents in shard order, each cropped to doc_cap characters, until max_chars were read."""
    nchars = 0
    for path in split_paths("train"):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = text[:doc_cap]
                nchars += len(doc)
                yield doc
                if nchars >= max_chars:
                    return


def train_tokenizer():
    """Train the BPE tokenizer on the training shards and write tokenizer.pkl and token_bytes.pt.

    Skipped when both files exist. Byte-level BPE by rustbpe with SPLIT_PATTERN,
    VOCAB_SIZE - 4 mergeable tokens, then the 4 special tokens; the result is a
    pickled `tiktoken.Encoding`. token_bytes.pt holds, per token id, the UTF-8
    byte length of the token (0 for special tokens): the metric's denominator.

    Raises:
        SystemExit: fewer than 2 shards are in the cache.
    """
    import rustbpe
    import tiktoken

    tokenizer_pkl = os.path.join(TOKENIZER_DIR, "tokenizer.pkl")
    token_bytes_path = os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    if os.path.exists(tokenizer_pkl) and os.path.exists(token_bytes_path):
        print(f"Tokenizer: already trained at {TOKENIZER_DIR}")
        return
    if len(list_parquet_files()) < 2:
        raise SystemExit("Tokenizer training needs at least 2 shards (one training shard and the validation shard).")
    os.makedirs(TOKENIZER_DIR, exist_ok=True)

    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(text_iterator(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    mergeable_ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    offset = len(mergeable_ranks)
    special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(
        name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=mergeable_ranks, special_tokens=special_tokens,
    )
    print(f"Tokenizer: trained vocab {enc.n_vocab} in {time.time() - t0:.1f}s")

    # byte length of each token's decoded string (as the reference counts it: a
    # token that is a partial UTF-8 sequence decodes to U+FFFD, 3 bytes)
    special_ids = set(special_tokens.values())
    token_bytes = torch.tensor(
        [0 if i in special_ids else len(enc.decode([i]).encode("utf-8")) for i in range(enc.n_vocab)],
        dtype=torch.int32,
    )
    sample = "Hello world! Numbers: 123, 4567. Unicode: 你好世界 ünïcödé"
    assert enc.decode(enc.encode_ordinary(sample)) == sample, "tokenizer round trip failed"

    with open(tokenizer_pkl, "wb") as f:
        pickle.dump(enc, f)
    torch.save(token_bytes, token_bytes_path)
    print(f"Tokenizer: saved to {TOKENIZER_DIR}")


# ---------------------------------------------------------------------------
# Runtime utilities (imported by train.py)
# ---------------------------------------------------------------------------

class Tokenizer:
    """Thin wrapper around the trained `tiktoken.Encoding`."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        """Load tokenizer.pkl (default dir: TOKENIZER_DIR). Raises SystemExit (run prepare.py) when it is missing."""
        path = os.path.join(tokenizer_dir or TOKENIZER_DIR, "tokenizer.pkl")
        if not os.path.exists(path):
            raise SystemExit(f"No tokenizer at {path}: run `uv run prepare.py` first.")
        with open(path, "rb") as f:
            return cls(pickle.load(f))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Encode a string (-> list[int]) or a list of strings (-> list[list[int]], batched).

        prepend: a token id or a special-token string put in front of every document.
        """
        if prepend is not None and not isinstance(prepend, int):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        if isinstance(text, list):
            ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return ids if prepend is None else [[prepend] + row for row in ids]
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu"):
    """int32 tensor (vocab,): UTF-8 byte length of each token, 0 for special tokens."""
    path = os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    if not os.path.exists(path):
        raise SystemExit(f"No {path}: run `uv run prepare.py` first.")
    return torch.load(path, map_location=device)


def _document_batches(split, tokenizer_batch_size=128):
    """Yield (list of document strings, epoch) forever, cycling over the split's shards.

    Shards are read in sorted order, row group by row group, and cut into
    batches of at most `tokenizer_batch_size` documents (a batch never spans two
    row groups). The epoch starts at 1 and grows by one at each full pass over
    the split. Raises SystemExit (via split_paths) when the split has no shards.
    """
    paths = split_paths(split)
    epoch = 1
    while True:
        for path in paths:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                for i in range(0, len(texts), tokenizer_batch_size):
                    yield texts[i:i + tokenizer_batch_size], epoch
        epoch += 1


def _token_batches(tokenizer, split):
    """Yield (list of token-id lists, epoch): each document batch encoded in one
    threaded tiktoken call. BOS is not prepended here: the packer writes it,
    which saves copying every list just to put one token in front."""
    for texts, epoch in _document_batches(split):
        yield tokenizer.encode(texts), epoch


def _pack_rows(token_batches, bos, B, T, buffer_size):
    """Best-fit packing of tokenized documents into rows of exactly T+1 tokens.

    token_batches: iterator of (list of token-id lists, epoch); each list is a
    document without its BOS, so the packed document is [bos] + ids, of length
    len(ids) + 1. Before each placement the buffer is topped up to
    `buffer_size` documents by fetching whole batches. Then, for the remaining
    space r of the current row: the longest buffered document of length <= r
    (earliest-arrived among equal lengths); if none fits, the shortest
    (earliest-arrived among equals), cropped to r, its rest dropped. Removing
    documents from the middle keeps the others in arrival order, so "earliest
    in the buffer" is "earliest arrived".

    The buffer is a dict length -> deque of documents (FIFO = arrival order)
    plus the sorted list of distinct lengths, so a choice is one bisect instead
    of a scan of the whole buffer. Rows are built as one flat list of Python
    ints and converted to int64 once per batch.

    Yields:
        (rows, epoch) forever: rows a new numpy int64 array (B, T+1); epoch the
        epoch of the most recently fetched document batch.
    Raises:
        ValueError: B, T or buffer_size is below 1.
        RuntimeError (from StopIteration): token_batches ran out.
    """
    if B < 1 or T < 1 or buffer_size < 1:
        raise ValueError(f"need B, T, buffer_size >= 1, got {B}, {T}, {buffer_size}")
    capacity = T + 1
    buckets = {}      # packed length -> deque of documents of that length, in arrival order
    lengths = []      # sorted distinct packed lengths that have a non-empty bucket
    buffered = 0
    epoch = None
    while True:
        flat = []
        for _ in range(B):
            remaining = capacity
            while remaining > 0:
                while buffered < buffer_size:
                    docs, epoch = next(token_batches)
                    for doc in docs:
                        n = len(doc) + 1
                        bucket = buckets.get(n)
                        if bucket is None:
                            bucket = buckets[n] = deque()
                            insort(lengths, n)
                        bucket.append(doc)
                    buffered += len(docs)
                # longest length <= remaining, else index 0: the shortest
                i = max(bisect_right(lengths, remaining) - 1, 0)
                n = lengths[i]
                bucket = buckets[n]
                doc = bucket.popleft()
                if not bucket:
                    del buckets[n]
                    del lengths[i]
                buffered -= 1
                flat.append(bos)
                if n <= remaining:
                    flat.extend(doc)
                    remaining -= n
                else:
                    flat.extend(doc[:remaining - 1])
                    remaining = 0
        # fromiter converts Python ints about twice as fast as np.array or slice assignment
        yield np.fromiter(flat, dtype=np.int64, count=B * capacity).reshape(B, capacity), epoch


def make_dataloader(tokenizer, B, T, split, buffer_size=1000):
    """BOS-aligned best-fit packing of documents into rows of exactly T+1 tokens.

    Documents of `split` ("train": every shard but the validation shard, cycled
    forever; "val": the validation shard only) are tokenized 128 at a time with
    BOS in front, and every row is filled left to right from a buffer of
    `buffer_size` documents: take the longest document that fits the remaining
    space (earliest among equals); if none fits, take the shortest (earliest
    among equals), crop it to the remaining space and drop its rest. Rows start
    with BOS and have no padding. This is SPEC.md's algorithm, batch for batch;
    only the search is faster (see _pack_rows).

    Yields:
        (inputs, targets, epoch) forever: int64 tensors of shape (B, T) on
        DEVICE_TYPE, inputs = row[:, :-1] and targets = row[:, 1:]; epoch (int,
        from 1) is the pass over the split that the last fetched documents came
        from. On CUDA they are copied from pinned host memory with a
        non-blocking copy. The same tensors are overwritten by the next batch:
        clone them to keep them.
    Raises:
        ValueError: B, T or buffer_size is below 1.
        SystemExit: the split has no shards (run prepare.py).
    """
    assert split in ("train", "val"), split
    rows = _pack_rows(_token_batches(tokenizer, split), tokenizer.get_bos_token_id(), B, T, buffer_size)

    use_cuda = DEVICE_TYPE == "cuda"
    cpu_buffer = torch.empty(2 * B * T, dtype=torch.long, pin_memory=use_cuda)
    cpu_inputs, cpu_targets = cpu_buffer[:B * T].view(B, T), cpu_buffer[B * T:].view(B, T)
    if DEVICE_TYPE == "cpu":
        dev_buffer = cpu_buffer
    else:
        dev_buffer = torch.empty(2 * B * T, dtype=torch.long, device=DEVICE_TYPE)
    inputs, targets = dev_buffer[:B * T].view(B, T), dev_buffer[B * T:].view(B, T)
    copied = None     # CUDA event: the last copy out of cpu_buffer has finished

    for batch, epoch in rows:
        if copied is not None:
            # a non-blocking copy may still be reading cpu_buffer: let it finish first
            copied.synchronize()
        batch = torch.from_numpy(batch)
        cpu_inputs.copy_(batch[:, :-1])
        cpu_targets.copy_(batch[:, 1:])
        if dev_buffer is not cpu_buffer:
            dev_buffer.copy_(cpu_buffer, non_blocking=use_cuda)
            if use_cuda:
                copied = torch.cuda.Event()
                copied.record()
        yield inputs, targets, epoch


# ---------------------------------------------------------------------------
# Evaluation (the metric: never change it)
# ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte of `model` on the first EVAL_TOKENS tokens of the validation shard.

    model(x, y, reduction="none") must return per-token cross-entropy in nats,
    shape (B*T,) or (B, T). The sum of the losses of targets that decode to at
    least one byte (special tokens excluded) is divided by ln 2 times the total
    UTF-8 byte length of the targets. Unlike loss per token, this does not
    depend on the vocabulary, so tokenizer changes stay comparable.
    """
    token_bytes = get_token_bytes(device=DEVICE_TYPE)
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val")
    steps = EVAL_TOKENS // (batch_size * MAX_SEQ_LEN)
    assert steps > 0, f"EVAL_TOKENS={EVAL_TOKENS} is less than one batch of {batch_size}x{MAX_SEQ_LEN}"
    total_nats = 0.0
    total_bytes = 0
    for _ in range(steps):
        x, y, _ = next(loader)
        loss = model(x, y, reduction="none").view(-1)
        nbytes = token_bytes[y.view(-1)]
        total_nats += (loss * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download ClimbMix shards and train the autoresearch tokenizer.")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download, -1 for all (default 10)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--data-url", default=os.environ.get("AUTORESEARCH_DATA_URL", BASE_URL),
                        help="shard source: http(s) URL, file:// URL or local directory (env AUTORESEARCH_DATA_URL)")
    args = parser.parse_args()
    num_shards = MAX_SHARD if args.num_shards == -1 else args.num_shards
    if not 1 <= num_shards <= MAX_SHARD:
        parser.error(f"--num-shards must be -1 or between 1 and {MAX_SHARD}")
    print(f"Cache directory: {CACHE_DIR}")
    download_data(num_shards, source=args.data_url, workers=args.download_workers)
    train_tokenizer()
    print("Done: run `uv run train.py`.")
    sys.exit(0)

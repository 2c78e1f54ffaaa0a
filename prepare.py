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
import functools
import json
import math
import os
import pickle
import queue
import shutil
import sys
import threading
import time
import urllib.parse
from bisect import bisect_right, insort
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.pool import ThreadPool

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

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
# measurement on a 2-core CPU (docs/cpu.md): shorter context and fewer eval
# tokens, so that startup plus evaluation stay within a minute.
if DEVICE_TYPE == "cuda":
    MAX_SEQ_LEN = 2048              # context length
    EVAL_TOKENS = 40 * 524288       # validation tokens for evaluate_bpb
else:
    MAX_SEQ_LEN = 256
    EVAL_TOKENS = 2 * 65536
TIME_BUDGET = 300                   # training time budget, seconds
VOCAB_SIZE = 8192

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
HF_REPO = "karpathy/climbmix-400b-shuffle"  # dataset repo on the Hugging Face hub (HF_ENDPOINT for a mirror)
MAX_SHARD = 6542                    # shard_06542.parquet is the last one
VAL_SHARD = MAX_SHARD               # pinned validation shard, never trained on
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"

# GPT-4 style split, but digits in groups of 1-2 (not 1-3): better for a small vocab
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"
TOKENIZER_MAX_CHARS = 1_000_000_000  # characters of training text read for BPE
TOKENIZER_DOC_CAP = 10_000           # each document cropped to this many characters

# Download behaviour (on the hub, huggingface_hub's retry policy applies instead of the first two)
DOWNLOAD_ATTEMPTS = 5                # tries per request to an http(s) --data-url
RETRY_AFTER_MAX = 300                # longest Retry-After wait honoured, seconds (bounds a run's wait)
DISK_CHECK_SAMPLE = 16               # shards whose size is asked for (HEAD) before downloading
# Per-shard size when the source states none: a ClimbMix shard holds ~61M tokens
# (400B / 6543), i.e. ~250M characters, ~100 MB as zstd parquet; rounded up.
SHARD_BYTES_GUESS = 120 * 10**6


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


# ---------------------------------------------------------------------------
# Data download
# ---------------------------------------------------------------------------
# From the hub through huggingface_hub (HF_ENDPOINT, HF_TOKEN, HF_HUB_* settings, Xet; its retries and resumption)
# or from --data-url: a directory, a file:// URL or an http(s) mirror (urllib3 retries). A file lands in
# DATA_DIR/.partial/ and is renamed into DATA_DIR only once verify_shard() accepts it.
# The HTTP clients (huggingface_hub, httpx, requests) are imported inside the functions that use them: train.py
# imports this module and downloads nothing, so they would only lengthen its start-up (about a second).

def verify_shard(path):
    """None when `path` is a readable parquet file with a string column `text`, else why not (str); never raises.

    Reads only the footer and schema (a few KB): cheap enough for every cached shard at each start."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        return f"is not a readable parquet file ({e})"
    if "text" not in schema.names:
        return f"has no column 'text' (columns: {', '.join(schema.names)})"
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        return f"has a column 'text' of type {text_type}, not string"
    return None


def _local_dir(source):
    """The directory that a --data-url names (a path or a file:// URL), or None for an http(s) URL."""
    url = urllib.parse.urlparse(source)
    if url.scheme in ("http", "https"):
        return None
    return urllib.parse.unquote(url.path) if url.scheme == "file" else os.path.expanduser(source)


def _mirror_session(url):
    """A requests session for the http(s) mirror `url`."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    # connection errors, 429 and 5xx: DOWNLOAD_ATTEMPTS tries, 2, 4, 8 s apart or as long as Retry-After asks
    retry = Retry(total=DOWNLOAD_ATTEMPTS - 1, backoff_factor=1, status_forcelist=(429, 500, 502, 503, 504),
                  retry_after_max=RETRY_AFTER_MAX)
    session = requests.Session()
    session.mount(f"{urllib.parse.urlparse(url).scheme}://", HTTPAdapter(max_retries=retry))
    return session


def _one_line(e):
    # the clients wrap the error that matters (e.g. a refused connection) as the cause
    lines = [f"{type(x).__name__}: {(str(x).strip().splitlines() or [''])[0]}" for x in (e, e.__cause__) if x]
    return lines[0] + (f" ({lines[1]})" if len(lines) > 1 and lines[1] != lines[0] else "")


def download_shard(index, source=None, data_dir=None):
    """Make shard `index` present and valid in data_dir (default DATA_DIR), from `source` (None: the hub).

    A cached copy that verify_shard() rejects is fetched again; a fetched file is synced and renamed
    into place only once verify_shard() accepts it. Returns (filename, None), or (filename, one line of error)."""
    import httpx
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import hf_hub_download

    filename, partial_dir = shard_filename(index), os.path.join(data_dir or DATA_DIR, ".partial")
    path, partial = os.path.join(data_dir or DATA_DIR, filename), os.path.join(partial_dir, filename)
    if os.path.exists(path):
        if verify_shard(path) is None:
            return filename, None
        os.remove(path)
    os.makedirs(partial_dir, exist_ok=True)
    try:
        directory = _local_dir(source) if source else None
        if source is None:
            hf_hub_download(HF_REPO, filename, repo_type="dataset", local_dir=partial_dir)
        elif directory is not None:
            shutil.copyfile(os.path.join(directory, filename), partial)
        else:  # a body cut off mid-way is not retried: the shard fails, a rerun fetches it
            with _mirror_session(source).get(f"{source.rstrip('/')}/{filename}", stream=True,
                                             timeout=hf_constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                r.raise_for_status()
                with open(partial, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
        problem = verify_shard(partial)
        if problem:
            return filename, f"the fetched file {problem}"
        with open(partial, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave an empty "shard"
        os.replace(partial, path)
        return filename, None
    except (OSError, httpx.HTTPError, RuntimeError) as e:  # a refused connection closes the hub client's shared session
        return filename, _one_line(e)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _stated_size(source, index):
    """Bytes that `source` states for shard `index` (a HEAD request, not retried), or None."""
    import httpx
    import requests
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    filename = shard_filename(index)
    try:
        if source is None:
            return get_hf_file_metadata(hf_hub_url(HF_REPO, filename, repo_type="dataset")).size
        directory = _local_dir(source)
        if directory is not None:
            return os.path.getsize(os.path.join(directory, filename))
        with requests.head(f"{source.rstrip('/')}/{filename}", allow_redirects=True,
                           timeout=hf_constants.HF_HUB_ETAG_TIMEOUT) as r:
            return int(r.headers["Content-Length"]) if r.ok and r.headers.get("Content-Length", "").isdigit() else None
    except (OSError, httpx.HTTPError, RuntimeError):  # as in download_shard: the hub client closed by a refusal
        return None


def download_data(num_shards, source=None, workers=8):
    """Make training shards 0..num_shards-1 and the validation shard present and valid in DATA_DIR.

    Deletes cached shards that fail verify_shard(), refuses when the disk cannot hold the missing ones (sizes
    the source states for DISK_CHECK_SAMPLE of them), fetches them in `workers` threads. Raises SystemExit for
    too little disk space or any shard not fetched: one line per distinct failure, then the overrides."""
    from huggingface_hub import constants as hf_constants

    where = source or f"{hf_constants.ENDPOINT}/datasets/{HF_REPO}"
    partial_dir = os.path.join(DATA_DIR, ".partial")
    shutil.rmtree(partial_dir, ignore_errors=True)  # an interrupted run's leftovers
    os.makedirs(DATA_DIR, exist_ok=True)
    indices = list(range(num_shards)) + [VAL_SHARD]
    paths = {i: os.path.join(DATA_DIR, shard_filename(i)) for i in indices}
    failed = {}
    with ThreadPool(max(1, min(workers, len(indices)))) as pool:  # daemon threads: Ctrl-C or a kill stops them too
        cached = [i for i in indices if os.path.exists(paths[i])]
        for i, problem in zip(cached, pool.map(verify_shard, [paths[i] for i in cached])):
            if problem:
                print(f"{shard_filename(i)}: the cached file {problem}; deleting it and fetching it again")
                os.remove(paths[i])
        missing = [i for i in indices if not os.path.exists(paths[i])]
        print(f"{len(indices) - len(missing)}/{len(indices)} shards already in {DATA_DIR}")
        if missing:
            sizes = [s for s in pool.map(functools.partial(_stated_size, source), missing[:DISK_CHECK_SAMPLE]) if s]
            per_shard = sum(sizes) / len(sizes) if sizes else SHARD_BYTES_GUESS
            needed, free = sum(sizes) + per_shard * (len(missing) - len(sizes)), shutil.disk_usage(DATA_DIR).free
            if needed > free:
                basis = (f"sizes stated by the source for {len(sizes)} of them" if sizes
                         else f"about {SHARD_BYTES_GUESS / 1e6:.0f} MB each, the source stated no sizes")
                raise SystemExit(f"prepare.py: not enough disk space for {DATA_DIR}: {len(missing)} shard(s) to "
                                 f"fetch need about {needed / 1e9:.2f} GB ({basis}), only {free / 1e9:.2f} GB are "
                                 f"free. Free some space, ask for fewer --num-shards or move AUTORESEARCH_CACHE_DIR.")
            print(f"Downloading {len(missing)} shards from {where} ({workers} workers)")
            fetch = functools.partial(download_shard, source=source, data_dir=DATA_DIR)
            for filename, error in tqdm(pool.imap_unordered(fetch, missing), total=len(missing), desc="Downloading",
                                        unit="shard", disable=None):
                if error is not None:
                    failed.setdefault(error.replace(filename, "*"), []).append(filename)  # the same failure
    shutil.rmtree(partial_dir, ignore_errors=True)
    count = sum(map(len, failed.values()))
    print(f"{len(indices) - count}/{len(indices)} shards ready in {DATA_DIR}")
    if not failed:
        return
    lines = [f"prepare.py: could not fetch {count} of {len(indices)} shard(s) from {where}:"]
    lines += [f"  {min(names)}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {error}"
              for error, names in sorted(failed.items(), key=lambda item: min(item[1]))[:10]]
    lines.append("Point --data-url or AUTORESEARCH_DATA_URL at a mirror (an http(s) URL, a file:// URL or a directory "
                 "holding the same shard names), or HF_ENDPOINT at a mirror of the hub. Rerunning prepare.py keeps "
                 "the shards fetched and fetches only the missing ones.")
    if not os.path.exists(paths[VAL_SHARD]):
        lines.append(f"The validation shard {VAL_FILENAME} is missing: nothing can be evaluated without it.")
    if not any(os.path.exists(paths[i]) for i in indices[:-1]):
        lines.append("No training shard is ready.")
    raise SystemExit("\n".join(lines))


def list_parquet_files():
    """Sorted paths of the shards in DATA_DIR; SystemExit saying to run prepare.py when there are none."""
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


def load_tokenizer_files(tokenizer_dir=None):
    """Load tokenizer.pkl and token_bytes.pt from tokenizer_dir (default TOKENIZER_DIR) and check they form a pair.

    Cheap (one unpickle, one 32 KB tensor). A pair is broken when a file is
    missing or unreadable, token_bytes.pt is not a 1-D integer tensor, the
    tokenizer lacks the BOS token, or their vocabulary sizes differ.

    Returns:
        (enc, token_bytes): the `tiktoken.Encoding` and the int tensor on the CPU.
    Raises:
        ValueError: the pair is missing or broken; the message says what is wrong.
    """
    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    pkl_path = os.path.join(tokenizer_dir, "tokenizer.pkl")
    bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
    exists = [os.path.exists(p) for p in (pkl_path, bytes_path)]
    if not any(exists):
        raise ValueError(f"no tokenizer in {tokenizer_dir}")
    if not all(exists):
        have, lack = (pkl_path, bytes_path) if exists[0] else (bytes_path, pkl_path)
        raise ValueError(f"{have} exists but {lack} is missing")
    try:
        with open(pkl_path, "rb") as f:
            enc = pickle.load(f)
        vocab_size = enc.n_vocab
    except Exception as e:  # a truncated or foreign pickle fails in many ways
        raise ValueError(f"{pkl_path} cannot be read ({type(e).__name__}: {e})") from e
    try:
        token_bytes = torch.load(bytes_path, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{bytes_path} cannot be read ({type(e).__name__}: {e})") from e
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.dim() == 1 and not token_bytes.is_floating_point()):
        raise ValueError(f"{bytes_path} is not a 1-D integer tensor")
    if BOS_TOKEN not in enc.special_tokens_set:
        raise ValueError(f"{pkl_path} has no {BOS_TOKEN} token")
    if len(token_bytes) != vocab_size:
        raise ValueError(f"{pkl_path} has {vocab_size} tokens but {bytes_path} has {len(token_bytes)} entries")
    return enc, token_bytes


def _write_atomically(path, write):
    # write(f) fills path.tmp, which is synced and renamed over path: a crash
    # leaves the old file or the new one, never half of one
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def train_tokenizer():
    """Train the BPE tokenizer on the training shards and write tokenizer.pkl and token_bytes.pt.

    Skipped when both files exist and load_tokenizer_files() accepts them; a
    broken pair (one file missing, unreadable, or vocabulary sizes that differ)
    is reported, deleted and trained again. Byte-level BPE by rustbpe with
    SPLIT_PATTERN, VOCAB_SIZE - 4 mergeable tokens, then the 4 special tokens;
    the result is a pickled `tiktoken.Encoding`. token_bytes.pt holds, per
    token id, the UTF-8 byte length of the token (0 for special tokens): the
    metric's denominator. Both files are written atomically. A progress bar
    (tqdm, silent when stderr is not a terminal) counts the characters read.

    Raises:
        SystemExit: fewer than 2 shards are in the cache.
    """
    import rustbpe
    import tiktoken

    tokenizer_pkl = os.path.join(TOKENIZER_DIR, "tokenizer.pkl")
    token_bytes_path = os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    try:
        load_tokenizer_files()
        print(f"Tokenizer: already trained at {TOKENIZER_DIR}")
        return
    except ValueError as e:
        if os.path.exists(tokenizer_pkl) or os.path.exists(token_bytes_path):
            print(f"Tokenizer: {e}; training it again")
            # drop both now: a crash between the two writes below must not pair a new file with an old one
            for path in (tokenizer_pkl, token_bytes_path):
                if os.path.exists(path):
                    os.remove(path)
    if len(list_parquet_files()) < 2:
        raise SystemExit("Tokenizer training needs at least 2 shards (one training shard and the validation shard).")
    os.makedirs(TOKENIZER_DIR, exist_ok=True)

    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    with tqdm(total=TOKENIZER_MAX_CHARS, desc="Tokenizer", unit="char", unit_scale=True, disable=None) as bar:
        def counted_documents():
            for doc in text_iterator():
                bar.update(len(doc))
                yield doc
        bpe.train_from_iterator(counted_documents(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
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

    _write_atomically(token_bytes_path, lambda f: torch.save(token_bytes, f))
    _write_atomically(tokenizer_pkl, lambda f: pickle.dump(enc, f))
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
        """Load the trained tokenizer from tokenizer_dir (default TOKENIZER_DIR).

        Raises:
            SystemExit: tokenizer.pkl or token_bytes.pt is missing, unreadable,
            or the two disagree (see load_tokenizer_files); the message says to
            rerun prepare.py, which trains them again.
        """
        try:
            enc, _ = load_tokenizer_files(tokenizer_dir)
        except ValueError as e:
            raise SystemExit(f"Tokenizer: {e}. Run `uv run prepare.py` to train it.") from None
        return cls(enc)

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
    """int32 tensor (vocab,) on `device`: UTF-8 byte length of each token, 0 for special tokens.

    Raises:
        SystemExit: the tokenizer pair in TOKENIZER_DIR is missing or broken
        (see load_tokenizer_files); the message says to rerun prepare.py.
    """
    try:
        _, token_bytes = load_tokenizer_files()
    except ValueError as e:
        raise SystemExit(f"Tokenizer: {e}. Run `uv run prepare.py` to train it.") from None
    return token_bytes.to(device)


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


def _prefetch(items, depth=2):
    """Yield the items of the iterator `items`, computed up to `depth` ahead in a
    background thread.

    The dataloader reads parquet here, off the thread that packs rows (or, on a
    GPU host, launches the training step); reading releases the GIL for most
    of its time. Order is unchanged. An exception raised by `items` (for
    example SystemExit when the split has no shards) is raised here, at the
    point where its item would have been. Closing this generator (or dropping
    it) stops the thread and waits for it: it finishes at most the item in
    hand, then closes `items` if it is a generator.
    """
    ready = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def put(entry):
        while not closed.is_set():
            try:
                ready.put(entry, timeout=0.1)
                break
            except queue.Full:
                pass
        return not closed.is_set()

    def work():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((None, StopIteration))
        except BaseException as e:
            put((None, e))
        finally:
            if hasattr(items, "close"):  # a generator: run its cleanup in this thread
                items.close()

    worker = threading.Thread(target=work, daemon=True, name="dataloader-prefetch")
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if error is StopIteration:
                return
            if error is not None:
                raise error
            yield item
    finally:
        closed.set()
        if not sys.is_finalizing():  # at interpreter exit daemon threads are frozen: never join them
            worker.join()


# tiktoken threads for the dataloader: 8 as the reference, but no more than the cores
# this process may use. More threads than cores only adds contention: on 2 cores,
# 8 threads tokenize the Shakespeare mirror at 2.0 M tokens/s and 2 threads at 2.9 M.
TOKENIZER_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1)
# document batches queued on the tokenizer threads ahead of the one being packed
# (plus one in the reader's hand): enough to keep them busy through a GPU step
TOKENIZE_AHEAD = 4


def _token_batches(tokenizer, split, ahead=TOKENIZE_AHEAD):
    """Yield (list of uint32 numpy arrays, epoch): the token ids of each document
    batch of _document_batches, in order, without BOS (the packer writes it).

    A _prefetch thread reads the batches and queues them on a pool of
    TOKENIZER_THREADS threads, up to `ahead` batches before the one the caller
    waits for. So the pool never waits for parquet or for the packer: reading,
    tokenizing and packing overlap. Each batch is cut into TOKENIZER_THREADS
    runs of consecutive documents. Two differences from tiktoken's
    encode_ordinary_batch, both to hold the GIL less (the packer needs it): one
    task per run instead of one per document, and encode_to_numpy, which hands
    back a buffer instead of a Python int per token. With no special token
    allowed, encode_to_numpy gives the same ids as encode_ordinary. Closing the
    generator drops the queued work.
    """
    encode = functools.partial(tokenizer.enc.encode_to_numpy, disallowed_special=())
    pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="dataloader-tokenizer")

    def queued():
        for texts, epoch in _document_batches(split):
            step = -(-len(texts) // TOKENIZER_THREADS)
            runs = [texts[i:i + step] for i in range(0, len(texts), step)]
            yield [pool.submit(lambda run: [encode(text) for text in run], run) for run in runs], epoch

    batches = _prefetch(queued(), depth=ahead)
    try:
        for runs, epoch in batches:
            yield [ids for run in runs for ids in run.result()], epoch
    finally:
        batches.close()  # first stop the reader, then drop what it queued
        pool.shutdown(cancel_futures=True)


def _pack_rows(token_batches, bos, B, T, buffer_size):
    """Best-fit packing of tokenized documents into rows of exactly T+1 tokens.

    token_batches: iterator of (list of documents, epoch); a document is its
    token ids without BOS (a uint32 array from _token_batches, or any sequence
    of ints), so the packed document is [bos] + ids, of length len(ids) + 1.
    Before each placement the buffer is topped up to `buffer_size` documents by
    fetching whole batches. Then, for the remaining space r of the current row:
    the longest buffered document of length <= r (earliest-arrived among equal
    lengths); if none fits, the shortest (earliest-arrived among equals),
    cropped to r, its rest dropped. Removing documents from the middle keeps
    the others in arrival order, so "earliest in the buffer" is "earliest
    arrived".

    The buffer is a dict length -> deque of documents (FIFO = arrival order)
    plus the sorted list of distinct lengths, so a choice is one bisect instead
    of a scan of the whole buffer. Each document is copied into the batch with
    one slice assignment.

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
        rows = np.empty((B, capacity), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < capacity:
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
                # longest length <= remaining space, else index 0: the shortest
                i = max(bisect_right(lengths, capacity - pos) - 1, 0)
                n = lengths[i]
                bucket = buckets[n]
                doc = bucket.popleft()
                if not bucket:
                    del buckets[n]
                    del lengths[i]
                buffered -= 1
                row[pos] = bos
                end = min(pos + n, capacity)
                row[pos + 1:end] = doc[:end - pos - 1]
                pos = end
        yield rows, epoch


def make_dataloader(tokenizer, B, T, split, buffer_size=1000):
    """BOS-aligned best-fit packing of documents into rows of exactly T+1 tokens.

    Documents of `split` ("train": every shard but the validation shard, cycled
    forever; "val": the validation shard only) are tokenized 128 at a time with
    BOS in front (in background threads, TOKENIZE_AHEAD batches ahead), and
    every row is filled left to right from a buffer of `buffer_size` documents:
    take the longest document that fits the remaining space (earliest among
    equals); if none fits, take the shortest (earliest among equals), crop it
    to the remaining space and drop its rest. Rows start with BOS and have no
    padding. This is the reference's algorithm, batch for batch; only the search is
    faster (see _pack_rows).

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
    """Bits per byte of `model` on the first EVAL_TOKENS // MAX_SEQ_LEN rows of the validation loader.

    model(x, y, reduction="none") must return per-token cross-entropy in nats,
    shape (B*T,) or (B, T). The sum of the losses of targets that decode to at
    least one byte (special tokens excluded) is divided by ln 2 times the total
    UTF-8 byte length of the targets. Unlike loss per token, this does not
    depend on the vocabulary, so tokenizer changes stay comparable.

    The rows scored do not depend on batch_size: the packer fills rows one
    after the other whatever B is, and the last batch counts only the rows it
    still needs (its other rows are computed and ignored, so the model always
    sees batches of one shape and a compiled model does not recompile). When
    batch_size divides the row count this is the reference's computation,
    EVAL_TOKENS // (batch_size * MAX_SEQ_LEN) full batches; otherwise the
    reference would score fewer rows.
    """
    token_bytes = get_token_bytes(device=DEVICE_TYPE)
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val")
    rows = EVAL_TOKENS // MAX_SEQ_LEN
    assert rows > 0, f"EVAL_TOKENS={EVAL_TOKENS} is less than one row of {MAX_SEQ_LEN}"
    total_nats = 0.0
    total_bytes = 0
    for start in range(0, rows, batch_size):
        x, y, _ = next(loader)
        loss = model(x, y, reduction="none").view(y.shape)
        n = min(batch_size, rows - start)  # rows of this batch that count
        loss, y = loss[:n].reshape(-1), y[:n].reshape(-1)
        nbytes = token_bytes[y]
        total_nats += (loss * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)


MIN_DISTINCT_ROWS = 0.9  # share of the evaluation's rows that must be distinct before check_val_split warns


def check_val_split(tokenizer, buffer_size=1000):
    """Say whether the validation split is large enough for evaluate_bpb to mean what it says.

    evaluate_bpb reads the first EVAL_TOKENS // MAX_SEQ_LEN rows of the "val"
    loader. When the split is small the loader cycles it to keep `buffer_size`
    documents buffered, and the packer crops long documents and drops their
    rest, so rows repeat and the evaluation may see only a handful of distinct
    rows. This packs exactly those rows (no model: it costs what reading the
    evaluation's tokens costs) and counts the distinct ones. The tokens of the
    split are counted only when the rows needed a second pass over it.

    Returns:
        str: one line (documents, distinct rows) when the split is fine; a
        WARNING of two lines when it has fewer documents than buffer_size,
        fewer tokens than EVAL_TOKENS, or fewer than MIN_DISTINCT_ROWS of the
        rows are distinct. The warning gives those counts and says that
        val_bpb on this split is not comparable.
    The answer is kept in CACHE_DIR/val_check.json, keyed by the shard, the
    tokenizer and the constants, so train.py does not repack the evaluation's
    rows at every start (prepare.py computes it at the end).

    Raises:
        SystemExit: the validation shard is missing (see split_paths).
    """
    (path,) = split_paths("val")
    record = os.path.join(CACHE_DIR, "val_check.json")
    files = [path, os.path.join(TOKENIZER_DIR, "tokenizer.pkl")]
    key = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files] + [EVAL_TOKENS, MAX_SEQ_LEN, buffer_size]
    try:
        with open(record) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["message"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or stale: compute it
    message = _val_split_report(tokenizer, path, buffer_size)
    try:
        with open(record + ".tmp", "w") as f:
            json.dump({"key": key, "message": message}, f)
        os.replace(record + ".tmp", record)
    except OSError:
        pass  # a read-only cache: compute it again next time
    return message


def _val_split_report(tokenizer, path, buffer_size):
    """check_val_split's computation, uncached."""
    n_docs = pq.ParquetFile(path).metadata.num_rows
    rows = EVAL_TOKENS // MAX_SEQ_LEN
    batches = _token_batches(tokenizer, "val")
    try:
        packer = _pack_rows(batches, tokenizer.get_bos_token_id(), 1, MAX_SEQ_LEN, buffer_size)
        distinct, cycled = set(), False
        for _ in range(rows):
            row, epoch = next(packer)
            distinct.add(row.tobytes())
            cycled |= epoch > 1
    finally:
        batches.close()
    tokens = None  # not counted when one pass held every row: then it has more than EVAL_TOKENS
    if cycled:
        batches = _token_batches(tokenizer, "val")
        try:  # one pass, BOS included; the split is small enough to have been cycled, so this is quick
            tokens = 0
            for docs, epoch in batches:
                if epoch > 1:
                    break
                tokens += sum(len(ids) + 1 for ids in docs)
        finally:
            batches.close()
    seen = f"{len(distinct):,} distinct rows of {rows:,}"
    counts = f"{n_docs:,} documents" + (f", {tokens:,} tokens" if tokens is not None else "")
    if n_docs >= buffer_size and (tokens is None or tokens >= EVAL_TOKENS) and len(distinct) >= MIN_DISTINCT_ROWS * rows:
        return f"Validation split: {counts}; the evaluation reads {seen}"
    return (f"WARNING: the validation split {path} is too small for the evaluation: {counts}, while the loader keeps "
            f"{buffer_size:,} documents buffered and the evaluation reads {rows:,} rows of {MAX_SEQ_LEN} tokens "
            f"(EVAL_TOKENS {EVAL_TOKENS:,}).\nWARNING: the evaluation sees {seen}: val_bpb on this split is not "
            f"comparable with val_bpb on another split (use a validation shard with more documents and tokens).")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download ClimbMix shards and train the autoresearch tokenizer.")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download, -1 for all (default 10)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--data-url", default=os.environ.get("AUTORESEARCH_DATA_URL") or None,
                        help="shard source instead of the hub: an http(s) URL, a file:// URL or a local directory "
                             "holding the same shard names (env AUTORESEARCH_DATA_URL; HF_ENDPOINT names a hub mirror)")
    args = parser.parse_args()
    num_shards = MAX_SHARD if args.num_shards == -1 else args.num_shards
    if not 1 <= num_shards <= MAX_SHARD:
        parser.error(f"--num-shards must be -1 or between 1 and {MAX_SHARD}")
    print(f"Cache directory: {CACHE_DIR}")
    try:
        download_data(num_shards, source=args.data_url, workers=args.download_workers)
        train_tokenizer()
        print(check_val_split(Tokenizer.from_directory()))
    except KeyboardInterrupt:
        # nothing half-written counts as a shard or a tokenizer, so a rerun simply continues
        print("\nInterrupted: rerun prepare.py to continue; verified shards are kept.", file=sys.stderr)
        sys.exit(130)
    print("Done: run `uv run train.py`.")
    sys.exit(0)

"""The disk tier of the prefix cache: KV blocks in files, keyed by the model's identity and the
block's chained hash, so that they outlive eviction from memory and restarts of the engine.

Layout: `<root>/<model identity>/<block hash>.kvb`, one block per file:
    b"KVFLOWKV" | u32 version | u32 header length | header (JSON) | payload
The header names the model identity, the block hash, each tensor's shape and dtype, the payload
length and its blake2b checksum. A file whose header, length or checksum does not match what this
engine expects (corrupted, truncated, written by another model or another kvflow) is ignored with a
warning and never loaded into the cache.

Writes happen on a background thread (the step loop only copies the block to host memory); the
store keeps its total size under a cap by deleting the least recently used files. Reads happen on another
thread: the scheduler asks for a request's blocks (`fetch`) and the request waits in the loading-KV state
until they are in host memory, so a disk read never stalls a step; the runner's "load" op then copies
them into the cache.

As a `KVTier`, the store is keyed by block hash; its ops are "spill" (device block -> file) and "load"
(file -> device block), applied by the handlers registered at the end of this file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict

import torch

from kvflow.engine.block_ops import register_block_op
from kvflow.memory.tiers import KVTier
from kvflow.step import BlockOp

logger = logging.getLogger("kvflow")

MAGIC = b"KVFLOWKV"
VERSION = 1
SUFFIX = ".kvb"


def model_identity(path: str, parts: dict) -> str:
    """A digest of what determines a block's K/V values: the weights (size and a digest of their first and
    last MiB, per file) and `parts` (model config, dtypes, block size, quantization)."""
    h = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".gguf")))
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()


def _spec(tensors: list[torch.Tensor]) -> list[list]:
    return [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]


class DiskKVStore(KVTier):
    name, save_kind, load_kind = "disk", "spill", "load"

    def __init__(self, root: str, model_id: str, block_spec: list[list], max_bytes: int):
        self.dir = os.path.join(root, model_id)
        os.makedirs(self.dir, exist_ok=True)
        self.model_id, self.block_spec, self.max_bytes = model_id, block_spec, max_bytes
        self.lock = threading.Lock()
        self.index: OrderedDict[int, int] = OrderedDict()   # block hash -> file bytes, least recent first
        self.pending: set[int] = set()                     # queued for writing
        self.num_hits = self.num_rejected = self.num_written = 0
        files = []
        for name in os.listdir(self.dir):
            if name.endswith(SUFFIX):
                try:
                    st = os.stat(os.path.join(self.dir, name))
                    files.append((st.st_mtime, int(name[:-len(SUFFIX)], 16), st.st_size))
                except (OSError, ValueError):
                    continue
        for _, h, size in sorted(files):
            self.index[_signed(h)] = size
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._writer, name="kvflow-kv-store", daemon=True)
        self.thread.start()
        # reads: hash -> tensors (None: the file was refused); hashes queued for reading
        self.staged: dict[int, list[torch.Tensor] | None] = {}
        self.reading: set[int] = set()
        self.read_queue: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._reader, name="kvflow-kv-store-read", daemon=True)
        self.reader.start()

    def _path(self, block_hash: int) -> str:
        return os.path.join(self.dir, f"{block_hash & (2 ** 64 - 1):016x}{SUFFIX}")

    @property
    def num_bytes(self) -> int:
        return sum(self.index.values())

    def __contains__(self, block_hash: int) -> bool:
        with self.lock:
            return block_hash in self.index or block_hash in self.pending

    def contains(self, key: int) -> bool:
        return key in self

    # ---- reading: fetched on the reader thread, taken by the runner ---------------------------------------------

    def fetch(self, keys: list[int]) -> int | None:
        """Queue the keys not yet read (one job, read in order); None while any is being read, else how
        many leading keys are valid."""
        with self.lock:
            todo = [h for h in keys if h not in self.staged and h not in self.reading]
            self.reading.update(todo)
            busy = any(h in self.reading for h in keys)
        if todo:
            self.read_queue.put(todo)
        if busy:
            return None
        with self.lock:
            for i, h in enumerate(keys):
                if self.staged.get(h) is None:
                    return i
        return len(keys)

    def discard(self, keys: list[int]) -> None:
        with self.lock:
            for h in keys:
                self.staged.pop(h, None)

    def take(self, block_hash: int) -> list[torch.Tensor]:
        with self.lock:
            tensors = self.staged.pop(block_hash, None)
        if tensors is None:
            raise RuntimeError(f"KV store: block {block_hash:x} was not fetched before its load")
        return tensors

    def _reader(self) -> None:
        """Read each job's keys in order; after the first refused file the rest of the chain is useless,
        so it is not read (its keys stage None: not loadable this time)."""
        while True:
            keys = self.read_queue.get()
            if keys is None:
                return
            ok = True
            for h in keys:
                tensors = None
                if ok:
                    try:
                        tensors = self.load(h)
                    except Exception:
                        logger.exception("KV store: reading a block failed")
                    ok = tensors is not None
                with self.lock:
                    self.staged[h] = tensors
                    self.reading.discard(h)

    # ---- reading one block ----------------------------------------------------------------------------------

    def load(self, block_hash: int) -> list[torch.Tensor] | None:
        """The block's tensors (host memory), or None if it is not here or its file is not valid."""
        with self.lock:
            if block_hash not in self.index:
                return None
        path = self._path(block_hash)
        try:
            tensors = self._read(path, block_hash)
        except (OSError, ValueError) as e:
            logger.warning("KV store: ignoring %s: %s", path, e)
            with self.lock:
                self.index.pop(block_hash, None)
            self.num_rejected += 1
            return None
        with self.lock:
            self.index.move_to_end(block_hash)
        try:
            os.utime(path)              # recency survives a restart too
        except OSError:
            pass
        self.num_hits += 1
        return tensors

    def _read(self, path: str, block_hash: int) -> list[torch.Tensor]:
        with open(path, "rb") as f:
            data = f.read()
        if data[:8] != MAGIC:
            raise ValueError("not a kvflow KV block file")
        if len(data) < 16:
            raise ValueError("truncated header")
        version, header_len = struct.unpack("<II", data[8:16])
        if version != VERSION:
            raise ValueError(f"format version {version}, expected {VERSION}")
        try:
            header = json.loads(data[16:16 + header_len])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("corrupted header") from None
        if header.get("model_id") != self.model_id:
            raise ValueError("written for another model")
        if header.get("block_hash") != block_hash:
            raise ValueError("holds another block")
        if header.get("tensors") != self.block_spec:
            raise ValueError("tensor shapes or dtypes differ from this engine's KV cache")
        payload = data[16 + header_len:]
        if len(payload) != header.get("payload_bytes"):
            raise ValueError(f"truncated: {len(payload)} of {header.get('payload_bytes')} payload bytes")
        if hashlib.blake2b(payload, digest_size=16).hexdigest() != header.get("checksum"):
            raise ValueError("checksum mismatch")
        out, offset = [], 0
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        for shape, dtype in self.block_spec:
            dt = getattr(torch, dtype)
            n = dt.itemsize * int(torch.Size(shape).numel())
            out.append(buf[offset:offset + n].view(dt).reshape(shape))
            offset += n
        return out

    # ---- writing (background thread) --------------------------------------------------------------------------

    def save_async(self, block_hash: int, tensors: list[torch.Tensor]) -> None:
        """Queue a block (host copies of its tensors) for writing, unless it is already stored."""
        with self.lock:
            if block_hash in self.index or block_hash in self.pending:
                return
            self.pending.add(block_hash)
        self.queue.put((block_hash, tensors))

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.flush()
        self.queue.put(None)
        self.thread.join()
        self.read_queue.put(None)
        self.reader.join()
        self.staged.clear()

    def _writer(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:
                logger.exception("KV store: writing a block failed")
            finally:
                if item is not None:
                    with self.lock:
                        self.pending.discard(item[0])
                self.queue.task_done()

    def _write(self, block_hash: int, tensors: list[torch.Tensor]) -> None:
        payload = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
        header = json.dumps({"model_id": self.model_id, "block_hash": block_hash, "tensors": _spec(tensors),
                             "payload_bytes": len(payload),
                             "checksum": hashlib.blake2b(payload, digest_size=16).hexdigest()}).encode()
        path = self._path(block_hash)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<II", VERSION, len(header)) + header + payload)
        os.replace(tmp, path)            # readers never see a half-written file
        size = 16 + len(header) + len(payload)
        with self.lock:
            self.index[block_hash] = size
            self.num_written += 1
            victims = []
            total = sum(self.index.values())
            while total > self.max_bytes and len(self.index) > 1:
                h, n = self.index.popitem(last=False)
                victims.append(h)
                total -= n
        for h in victims:
            try:
                os.remove(self._path(h))
            except OSError:
                pass


def _signed(h: int) -> int:
    """File names hold the hash as unsigned hex; block hashes are signed 64-bit ints."""
    return h - 2 ** 64 if h >= 2 ** 63 else h


# ---- the runner's side: its ops ----------------------------------------------------------------------------

@register_block_op("spill")
def spill_blocks(runner, op: BlockOp) -> None:
    """Device blocks -> files (a host copy now, written by the store's thread)."""
    for b, h in zip(op.src, op.dst):
        runner.kv_store.save_async(h, runner.read_block(b))


@register_block_op("load")
def load_blocks(runner, op: BlockOp) -> None:
    """Fetched blocks (host memory) -> device blocks."""
    kv = runner.kv_tensors()
    for h, b in zip(op.src, op.dst):
        for t, x in zip(kv, runner.kv_store.take(h)):
            t[b].copy_(x)

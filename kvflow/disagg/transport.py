"""How a sync handoff's KV blocks travel from the prefill worker to the decode worker that pulls them. One
interface, one registry; each transport a class here (small) or a file of its own.

  stage(request id, arrays) -> descriptor   prefill side: the exported blocks are made reachable; the
                                             descriptor (plain data) goes to the decode worker through the client
  fetch(descriptor) -> arrays                decode side: pull them (one numpy array per KV tensor)
  release(request id)                        prefill side: the decode worker has them (or gave up)

  ray        the arrays go into Ray's object store (`ray.put`); the decode worker's `ray.get` pulls them from
             the prefill worker's node (zero-copy reads on one node)
  mooncake   Mooncake's transfer engine (PyPI `mooncake-transfer-engine-non-cuda`, over TCP here, RDMA where
             the machines have it): the prefill worker registers one contiguous buffer of the blocks, the
             decode worker registers its own and reads the bytes straight from the peer's memory
The streamed modes (async, layerwise) push blocks with Ray actor calls as they are computed (connector.py).
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

import numpy as np

logger = logging.getLogger("kvflow")

STALE_S = 120.0          # a staged buffer nobody pulled for this long is dropped


class KVTransport(ABC):
    name = ""

    def __init__(self):
        self.staged: dict[str, tuple[float, object]] = {}     # request id -> (when, what keeps it reachable)

    @abstractmethod
    def stage(self, request_id: str, arrays: list[np.ndarray]) -> dict: ...

    @abstractmethod
    def fetch(self, desc: dict) -> list[np.ndarray]: ...

    def release(self, request_id: str) -> None:
        self.staged.pop(request_id, None)

    def _keep(self, request_id: str, obj) -> None:
        """Hold `obj` until released; drop what nobody pulled for STALE_S."""
        now = time.monotonic()
        for rid in [r for r, (t, _) in self.staged.items() if now - t > STALE_S]:
            self.release(rid)
        self.staged[request_id] = (now, obj)


class RayTransport(KVTransport):
    name = "ray"

    def stage(self, request_id: str, arrays: list[np.ndarray]) -> dict:
        import ray
        ref = ray.put(arrays)
        self._keep(request_id, ref)            # the owner keeps it alive until released
        return {"transport": self.name, "refs": [ref]}

    def fetch(self, desc: dict) -> list[np.ndarray]:
        import ray
        return ray.get(desc["refs"][0], timeout=60)



class MooncakeTransport(KVTransport):
    name = "mooncake"

    def __init__(self):
        super().__init__()
        import ray
        from mooncake.engine import TransferEngine        # ImportError when it (or libibverbs) is missing
        self.host = ray.util.get_node_ip_address()
        self.engine = TransferEngine()
        if self.engine.initialize(self.host, "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("Mooncake's transfer engine did not start")
        self.session = f"{self.host}:{self.engine.get_rpc_port()}"

    def stage(self, request_id: str, arrays: list[np.ndarray]) -> dict:
        layout = [(list(a.shape), a.dtype.str) for a in arrays]
        buf = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]) if arrays \
            else np.zeros(1, np.uint8)
        if self.engine.register_memory(buf.ctypes.data, buf.nbytes) != 0:
            raise RuntimeError("Mooncake could not register the staged KV buffer")
        self._keep(request_id, buf)
        return {"transport": self.name, "session": self.session, "addr": buf.ctypes.data, "len": buf.nbytes,
                "layout": layout}

    def fetch(self, desc: dict) -> list[np.ndarray]:
        out = np.empty(desc["len"], np.uint8)
        if self.engine.register_memory(out.ctypes.data, out.nbytes) != 0:
            raise RuntimeError("Mooncake could not register the receive buffer")
        try:
            if self.engine.transfer_sync_read(desc["session"], out.ctypes.data, desc["addr"], desc["len"]) != 0:
                raise RuntimeError(f"Mooncake's read from {desc['session']} failed")
        finally:
            self.engine.unregister_memory(out.ctypes.data)
        arrays, at = [], 0
        for shape, dtype in desc["layout"]:
            dt = np.dtype(dtype)
            n = int(np.prod(shape)) * dt.itemsize
            arrays.append(out[at:at + n].view(dt).reshape(shape))
            at += n
        return arrays

    def release(self, request_id: str) -> None:
        staged = self.staged.pop(request_id, None)
        if staged is not None:
            self.engine.unregister_memory(staged[1].ctypes.data)


TRANSPORTS = {t.name: t for t in (RayTransport, MooncakeTransport)}


def mooncake_available() -> bool:
    try:
        import mooncake.engine  # noqa: F401
        return True
    except ImportError:
        return False

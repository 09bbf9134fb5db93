"""How the model runner applies `BlockOp`s: a registry from op kind to handler.

Each KV tier registers the kinds it emits (`@register_block_op("kind")`); the runner looks the handler up
by kind, so a new tier is a new file, never a new branch here. The device copy (copy-on-write) and the swap
tier live in this file; the disk tier's handlers live with its store (memory/disk_store.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvflow.step import BlockOp

if TYPE_CHECKING:
    from kvflow.engine.model_runner import ModelRunner

BLOCK_OP_HANDLERS: dict[str, Callable[["ModelRunner", BlockOp], None]] = {}


def register_block_op(kind: str):
    def wrap(fn):
        BLOCK_OP_HANDLERS[kind] = fn
        return fn
    return wrap


def apply_block_ops(runner: "ModelRunner", ops: list[BlockOp]) -> None:
    for op in ops:
        handler = BLOCK_OP_HANDLERS.get(op.kind)
        if handler is None:
            raise ValueError(f"no handler for block op {op.kind!r} (known: {', '.join(sorted(BLOCK_OP_HANDLERS))})")
        handler(runner, op)


def _ids(ids: list[int], device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64, device=device)


@register_block_op("copy")
def copy_blocks(runner: "ModelRunner", op: BlockOp) -> None:
    """Device block -> device block, for every KV tensor (copy-on-write of a shared block)."""
    src, dst = _ids(op.src, runner.device), _ids(op.dst, runner.device)
    for t in runner.kv_tensors():
        t.index_copy_(0, dst, t.index_select(0, src))


@register_block_op("swap_out")
def swap_out(runner: "ModelRunner", op: BlockOp) -> None:
    src, dst = _ids(op.src, runner.device), _ids(op.dst, "cpu")
    for t, host in zip(runner.kv_tensors(), runner.swap_tensors):
        host.index_copy_(0, dst, t.index_select(0, src).to("cpu"))


@register_block_op("swap_in")
def swap_in(runner: "ModelRunner", op: BlockOp) -> None:
    src, dst = _ids(op.src, "cpu"), _ids(op.dst, runner.device)
    for t, host in zip(runner.kv_tensors(), runner.swap_tensors):
        t.index_copy_(0, dst, host.index_select(0, src).to(runner.device))


@register_block_op("swap_in_async")
def swap_in_async(runner: "ModelRunner", op: BlockOp) -> None:
    """FastServe's asynchronous recovery: the copy back runs on the runner's copy thread while the step's
    forward runs (the scheduler does not compute the request in this step); the next step waits for it."""
    runner.background_copy(lambda: swap_in(runner, op))

"""Session records from the state pool and back: the one capture that feeds both state stores.

The snapshot file (serving.state.snapshot) and Redis (serving.state.recovery) save the same
SessionRecord of a session and write the same rows back when they restore one; this module reads
and writes those rows and builds the records.

Threads: the rows of a held session (no step in flight) in a host (numpy) pool are read and
written on the event loop: the state pool's contract is that only the worker touches a slot
while its session has a step in flight. Device pools are read and written on the model's worker
thread, between batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from serving.core.batcher import Batcher
from serving.core.registry import LoadedModel
from serving.core.sessions import Session
from serving.core.state_pool import HostStatePool, SavedRows
from serving.state.records import SessionRecord

T = TypeVar("T")


def on_worker(batcher: Batcher, task: Callable[[], T]) -> asyncio.Future[T]:
    """Queue `task` on the model's worker thread now (not when a coroutine first runs) and
    return a future of its result, so it runs before any work submitted after this call."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: Exception | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = task()
        except Exception as error:  # handed to the awaiting caller
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    batcher.submit(run)
    return future


def host_pool(model: LoadedModel) -> bool:
    """Whether the model's state rows live in host memory (read and written on the loop)."""
    return isinstance(model.engine.pool, HostStatePool)


async def read_rows(model: LoadedModel, slots: np.ndarray) -> SavedRows:
    """The rows of `slots` (held sessions of `model`), from where the pool may be read."""
    if host_pool(model):
        return model.engine.read_rows(slots)
    return await on_worker(model.batcher, lambda: model.engine.read_rows(slots))


async def write_rows(model: LoadedModel, rows: SavedRows) -> None:
    """Write restored rows into `model`'s pool (their sessions are held or not yet serving)."""
    if host_pool(model):
        model.engine.write_rows(rows)
    else:
        await on_worker(model.batcher, lambda: model.engine.write_rows(rows))


def session_record(
    model: LoadedModel,
    session: Session,
    last_used: float,
    states: Sequence[np.ndarray] = (),
    logits: np.ndarray | None = None,
    fresh: bool = False,
) -> SessionRecord:
    """The record of a session from its state rows, each (num_layers, hidden), and its last
    logits (vocab,), with its last use as wall-clock time.

    A session that consumed nothing since open or reset, or whose row is `fresh` (a device
    pool's fresh row holds whatever the slot had before), is in the zero state and is recorded
    as zeros; its rows need not be given.
    """
    manifest = model.manifest
    row = (manifest.num_layers, manifest.hidden_size)
    if session.position == 0 or fresh:
        states = [np.zeros(row, np.float32) for _ in manifest.state_names]
        logits = np.zeros(manifest.vocab_size, np.float32)
    elif logits is None or len(states) != len(manifest.state_names):
        raise ValueError(f"session {session.id} has consumed tokens: its state rows are needed")
    return SessionRecord(
        session_id=session.id,
        model=manifest.name,
        version=manifest.version,
        model_sha256=manifest.model_sha256,
        position=session.position,
        owner=session.owner,
        last_used=last_used,
        states=dict(zip(manifest.state_names, (np.asarray(s, np.float32) for s in states), strict=True)),
        last_logits=np.asarray(logits, np.float32),
    )


async def capture_held(
    model: LoadedModel, group: Sequence[Session], last_used: Callable[[Session], float]
) -> list[SessionRecord]:
    """Records of held sessions of one model; `last_used(session)` gives its wall-clock time."""
    rows = await read_rows(model, np.array([session.slot for session in group], np.int64))
    return [
        session_record(
            model,
            session,
            last_used(session),
            [state[i] for state in rows.states],
            rows.logits[i],
            fresh=bool(rows.fresh[i]),
        )
        for i, session in enumerate(group)
    ]


def restored_rows(model: LoadedModel, pairs: Sequence[tuple[Session, SessionRecord]]) -> SavedRows:
    """The rows to write for sessions opened from records (each session's slot, its record)."""
    manifest = model.manifest
    states = tuple(
        np.stack([record.states[name] for _, record in pairs]) for name in manifest.state_names
    )  # each (n, num_layers, hidden)
    no_logits = np.zeros(manifest.vocab_size, np.float32)
    logits = np.stack(
        [record.last_logits if record.last_logits is not None else no_logits for _, record in pairs]
    )  # (n, vocab)
    return SavedRows(
        slots=np.array([session.slot for session, _ in pairs], np.int64),
        states=states,
        logits=logits,
        fresh=np.array([record.position == 0 for _, record in pairs], dtype=bool),
    )

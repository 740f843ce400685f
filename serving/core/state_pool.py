"""Per-model-version state pools: every session's recurrent state is one row of shared arrays.

A pool holds, for each state tensor (h, and c for LSTM), one contiguous array of
(capacity, num_layers, hidden_size) float32, plus (capacity, vocab_size) float32 of each session's
last next-token logits (what a continued Generate without prompt samples from). A session owns a
slot index; a batch gathers its rows by slot, runs, and scatters the new rows back only after
the run succeeded, so a failed run leaves every session as it was.

HostStatePool keeps the arrays in numpy. np.zeros maps untouched pages lazily, so a pool sized for
the session limit costs memory only for the rows sessions have used. DeviceStatePool keeps the
state arrays as onnxruntime OrtValues on the device (CUDA), alternating two buffers per tensor:
the step graph reads pool A and writes pool B (a run never binds one buffer as both input and
output), and the pools swap only when the run succeeded.

Threads: slots are acquired and released on the event loop; rows of one slot are only touched by
the model's worker thread while that slot's session has a step in flight (the session manager
serialises a session's steps). DeviceStatePool.read_rows / write_rows / ensure_capacity run on the
worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


class PoolFullError(Exception):
    """Every slot of the pool is in use (the session limit bounds this before it happens)."""


class SlotAllocator:
    """Slot indices from a free list; never-used slots come from a high-water mark.

    Freed slots are reused first (last freed, first reused), so the rows in use stay in pages
    that are already resident.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[int] = []
        self._high_water = 0  # slots >= this have never been handed out

    @property
    def in_use(self) -> int:
        return self._high_water - len(self._free)

    @property
    def high_water(self) -> int:
        return self._high_water

    def acquire(self) -> int:
        if self._free:
            return self._free.pop()
        if self._high_water >= self.capacity:
            raise PoolFullError(f"all {self.capacity} state slots are in use")
        self._high_water += 1
        return self._high_water - 1

    def release(self, slot: int) -> None:
        self._free.append(slot)


@dataclass(frozen=True)
class SavedRows:
    """A copy of some slots' state rows and last logits (for rollback and snapshots)."""

    slots: np.ndarray  # (n,) int64
    states: tuple[np.ndarray, ...]  # each (n, num_layers, hidden)
    logits: np.ndarray  # (n, vocab)
    fresh: np.ndarray  # (n,) bool: the row was in the zero state (its arrays are not meaningful)


class HostStatePool:
    """Numpy state rows: gather by slot index for a batch, scatter back after a successful run."""

    def __init__(
        self, state_count: int, num_layers: int, hidden_size: int, vocab_size: int, capacity: int
    ) -> None:
        self.allocator = SlotAllocator(capacity)
        self.row_shape = (num_layers, hidden_size)
        # (capacity, num_layers, hidden) per state tensor; lazily zero pages.
        self.states = tuple(
            np.zeros((capacity, num_layers, hidden_size), np.float32) for _ in range(state_count)
        )
        self.logits = np.zeros((capacity, vocab_size), np.float32)  # (capacity, vocab)

    @property
    def row_bytes(self) -> int:
        """Bytes of one session's state (all tensors), the unit of the memory target."""
        return sum(s[0].nbytes for s in self.states)

    def acquire(self) -> int:
        slot = self.allocator.acquire()
        self.reset(slot)
        return slot

    def release(self, slot: int) -> None:
        self.allocator.release(slot)

    def reset(self, slot: int) -> None:
        """Return a slot to the zero state (a fresh session)."""
        for state in self.states:
            state[slot] = 0.0
        self.logits[slot] = 0.0

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each state tensor's rows for `slots`, as new contiguous (B, num_layers, hidden) arrays."""
        return tuple([state.take(slots, axis=0) for state in self.states])

    def scatter(self, slots: np.ndarray, states: Sequence[np.ndarray], logits: np.ndarray) -> None:
        """Write a successful run's new rows back: states (B, L, H) each, logits (B, vocab)."""
        for pool, rows in zip(self.states, states, strict=True):
            pool[slots] = rows
        self.logits[slots] = logits

    def read_rows(self, slots: np.ndarray) -> SavedRows:
        return SavedRows(
            slots.copy(), self.gather(slots), self.logits[slots], np.zeros(len(slots), dtype=bool)
        )

    def write_rows(self, saved: SavedRows) -> None:
        self.scatter(saved.slots, saved.states, saved.logits)


SessionFactory = Callable[[onnx.ModelProto], ort.InferenceSession]


def _row_graphs(num_layers: int, hidden_size: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Tiny graphs that read rows from, and write rows into, a device pool tensor."""
    row = [num_layers, hidden_size]
    pool = helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["capacity", *row])
    slots = helper.make_tensor_value_info("slots", TensorProto.INT64, ["rows"])
    rows = helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["rows", *row])
    pool_next = helper.make_tensor_value_info("pool_next", TensorProto.FLOAT, ["capacity", *row])
    opset = [helper.make_opsetid("", 17)]
    gather = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gather", ["pool", "slots"], ["rows"], axis=0)],
            "gather_rows",
            [pool, slots],
            [rows],
        ),
        opset_imports=opset,
    )
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    scatter = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Unsqueeze", ["slots", "axes"], ["indices"]),
                helper.make_node("ScatterND", ["pool", "indices", "rows"], ["pool_next"]),
            ],
            "scatter_rows",
            [pool, slots, rows],
            [pool_next],
            [axes],
        ),
        opset_imports=opset,
    )
    for model in (gather, scatter):
        model.ir_version = 8
    return gather, scatter


class DeviceStatePool:
    """State rows as device OrtValues, double-buffered; logits rows stay in host numpy.

    The pool starts at `initial_capacity` rows and doubles (up to `capacity`) when a slot beyond
    it is first used, because every step's ScatterND writes a full copy of the pool into the
    other buffer: a pool sized to the sessions in use keeps that copy small. A fresh or reset
    slot is not zeroed on the device; its `fresh` flag makes the step graph read zeros instead
    (the `keep` input), and the flag clears when a run including it succeeds.
    """

    def __init__(
        self,
        state_count: int,
        num_layers: int,
        hidden_size: int,
        vocab_size: int,
        capacity: int,
        device_type: str,
        device_id: int,
        make_session: SessionFactory,
        initial_capacity: int = 1024,
    ) -> None:
        self.allocator = SlotAllocator(capacity)
        self.row_shape = (num_layers, hidden_size)
        self.state_count = state_count
        self.device_type = device_type
        self.device_id = device_id
        self.logits = np.zeros((capacity, vocab_size), np.float32)
        self.fresh = np.ones(capacity, dtype=bool)
        self.device_capacity = 0
        # buffers[k] = [current, spare] OrtValues of (device_capacity, L, H) for state tensor k.
        self.buffers: list[list[ort.OrtValue]] = []
        gather, scatter = _row_graphs(num_layers, hidden_size)
        self._gather_rows = make_session(gather)
        self._scatter_rows = make_session(scatter)
        self.ensure_capacity(min(capacity, initial_capacity))

    @property
    def row_bytes(self) -> int:
        return self.state_count * int(np.prod(self.row_shape)) * 4

    def acquire(self) -> int:
        slot = self.allocator.acquire()
        self.reset(slot)
        return slot

    def release(self, slot: int) -> None:
        self.allocator.release(slot)

    def reset(self, slot: int) -> None:
        self.fresh[slot] = True
        self.logits[slot] = 0.0

    def _ortvalue(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, self.device_id)

    def ensure_capacity(self, rows: int) -> None:
        """Grow the device buffers to hold at least `rows` rows (worker thread only)."""
        if rows <= self.device_capacity:
            return
        new_capacity = max(rows, min(self.allocator.capacity, max(1, self.device_capacity) * 2))
        grown: list[list[ort.OrtValue]] = []
        for k in range(self.state_count):
            host = np.zeros((new_capacity, *self.row_shape), np.float32)
            if self.buffers:
                host[: self.device_capacity] = self.buffers[k][0].numpy()
            grown.append([self._ortvalue(host), self._ortvalue(host)])
        self.buffers = grown
        self.device_capacity = new_capacity

    def current(self, k: int) -> ort.OrtValue:
        return self.buffers[k][0]

    def spare(self, k: int) -> ort.OrtValue:
        return self.buffers[k][1]

    def swap(self) -> None:
        """Make the spare buffers (the run's outputs) current; call only after a successful run."""
        for pair in self.buffers:
            pair.reverse()

    def read_rows(self, slots: np.ndarray) -> SavedRows:
        self.ensure_capacity(int(slots.max()) + 1)
        states = []
        for k in range(self.state_count):
            binding = self._gather_rows.io_binding()
            binding.bind_ortvalue_input("pool", self.current(k))
            binding.bind_cpu_input("slots", slots.astype(np.int64))
            binding.bind_output("rows", "cpu")
            self._gather_rows.run_with_iobinding(binding)
            states.append(binding.get_outputs()[0].numpy())
        return SavedRows(slots.copy(), tuple(states), self.logits[slots], self.fresh[slots].copy())

    def write_rows(self, saved: SavedRows) -> None:
        self.ensure_capacity(int(saved.slots.max()) + 1)
        for k in range(self.state_count):
            binding = self._scatter_rows.io_binding()
            binding.bind_ortvalue_input("pool", self.current(k))
            binding.bind_cpu_input("slots", saved.slots.astype(np.int64))
            binding.bind_cpu_input("rows", np.ascontiguousarray(saved.states[k], np.float32))
            binding.bind_ortvalue_output("pool_next", self.spare(k))
            self._scatter_rows.run_with_iobinding(binding)
            self.buffers[k].reverse()
        self.logits[saved.slots] = saved.logits
        self.fresh[saved.slots] = saved.fresh

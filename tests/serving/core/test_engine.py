"""Engines and state pools: host and device-pool paths agree with the offline model, state changes
only after a successful run, outputs are pruned, and the CUDA path runs where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from contract import signature as sig
from contract.ort_errors import ORT_ERRORS
from serving.core.engine import (
    DeviceEngine,
    Engine,
    EngineOptions,
    HostEngine,
    host_graph,
    load_engine,
    pooled_graph,
)
from serving.core.repository import load_model_proto, read_manifest
from serving.core.state_pool import HostStatePool, PoolFullError, SlotAllocator
from tests.support.models import ALPHABET, Oracle


def engine_for(
    model_repository: Path, name: str, state_on_device: bool, device: str = "cpu", capacity: int = 64
) -> Engine:
    manifest = read_manifest(model_repository / name / "1")
    return load_engine(
        manifest,
        load_model_proto(manifest),
        EngineOptions(device=device, capacity=capacity),
        state_on_device=state_on_device,
    )


def test_slot_allocator_reuses_freed_slots_first() -> None:
    slots = SlotAllocator(3)
    assert [slots.acquire() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(PoolFullError):
        slots.acquire()
    slots.release(1)
    assert slots.acquire() == 1 and slots.in_use == 3


def test_host_pool_gathers_and_scatters_rows_by_slot() -> None:
    pool = HostStatePool(state_count=2, num_layers=2, hidden_size=3, vocab_size=4, capacity=5)
    assert pool.row_bytes == 2 * 2 * 3 * 4
    a, b = pool.acquire(), pool.acquire()
    slots = np.array([b, a])
    rows = (np.arange(12, dtype=np.float32).reshape(2, 2, 3), -np.ones((2, 2, 3), np.float32))
    pool.scatter(slots, rows, np.ones((2, 4), np.float32))
    gathered = pool.gather(np.array([a]))
    np.testing.assert_array_equal(gathered[0][0], rows[0][1])
    saved = pool.read_rows(np.array([a]))
    pool.reset(a)
    assert not pool.states[0][a].any() and not pool.logits[a].any()
    pool.write_rows(saved)
    np.testing.assert_array_equal(pool.states[1][a], rows[1][1])


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-gru"])
def test_host_and_device_pool_paths_match_the_offline_model(
    model_repository: Path, oracles: dict[str, Oracle], name: str
) -> None:
    host = engine_for(model_repository, name, state_on_device=False)
    device = engine_for(model_repository, name, state_on_device=True)
    assert isinstance(host, HostEngine) and isinstance(device, DeviceEngine)
    rng = np.random.default_rng(0)
    sessions = 10
    host_slots = np.array([host.acquire_slot() for _ in range(sessions)])
    device_slots = np.array([device.acquire_slot() for _ in range(sessions)])
    histories: list[list[int]] = [[] for _ in range(sessions)]
    for _ in range(12):
        rows = rng.choice(sessions, size=int(rng.integers(1, sessions + 1)), replace=False)
        width = int(rng.integers(1, 5))
        tokens = rng.integers(0, 32, size=(len(rows), width))
        lengths = rng.integers(1, width + 1, size=len(rows)).astype(np.int32)
        from_host = host.step(host_slots[rows], tokens, lengths)
        from_device = device.step(device_slots[rows], tokens, lengths)
        np.testing.assert_array_equal(from_host, from_device)
        for row, session in enumerate(rows):
            histories[session].extend(tokens[row, : lengths[row]].tolist())
        if rng.random() < 0.3:  # reset one session
            session = int(rng.choice(rows))
            host.reset_slot(int(host_slots[session]))
            device.reset_slot(int(device_slots[session]))
            histories[session] = []
    for session, history in enumerate(histories):
        if history:
            np.testing.assert_allclose(
                host.last_logits(int(host_slots[session])), oracles[name].last_logits(history), atol=1e-5
            )
            np.testing.assert_array_equal(
                host.last_logits(int(host_slots[session])), device.last_logits(int(device_slots[session]))
            )


def test_device_pool_grows_and_keeps_rows(model_repository: Path) -> None:
    engine = engine_for(model_repository, "tiny-gru", state_on_device=True, capacity=3000)
    assert isinstance(engine, DeviceEngine)
    first = engine.acquire_slot()
    engine.step(np.array([first]), np.array([[3, 4]]), np.array([2], np.int32))
    saved = engine.read_rows(np.array([first]))
    assert engine.pool.device_capacity == 1024
    engine.pool.ensure_capacity(2500)
    assert engine.pool.device_capacity == 2500
    np.testing.assert_array_equal(engine.read_rows(np.array([first])).states[0], saved.states[0])


@pytest.mark.parametrize("state_on_device", [False, True])
def test_a_failed_run_leaves_the_pool_unchanged(model_repository: Path, state_on_device: bool) -> None:
    engine = engine_for(model_repository, "tiny-lstm", state_on_device=state_on_device)
    slot = engine.acquire_slot()
    engine.step(np.array([slot]), np.array([[1, 2]]), np.array([2], np.int32))
    before = engine.read_rows(np.array([slot]))
    logits_before = engine.last_logits(slot).copy()
    with pytest.raises(ORT_ERRORS, match="Unexpected input data type"):  # int32 tokens
        engine.step(np.array([slot]), np.array([[1]], np.int32), np.array([1], np.int32))
    after = engine.read_rows(np.array([slot]))
    for old, new in zip(before.states, after.states, strict=True):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(engine.last_logits(slot), logits_before)


def test_graphs_compute_only_what_serving_reads(model_repository: Path) -> None:
    manifest = read_manifest(model_repository / "tiny-lstm" / "1")
    model = load_model_proto(manifest)
    assert sig.LOGITS in [o.name for o in model.graph.output]
    pruned = host_graph(model, "lstm")
    assert [o.name for o in pruned.graph.output] == [sig.HN, sig.CN, sig.LAST_LOGITS]
    pooled = pooled_graph(model, manifest)
    assert [i.name for i in pooled.graph.input] == [
        sig.TOKENS,
        sig.LENGTHS,
        "slots",
        "keep",
        "pool_h0",
        "pool_c0",
    ]
    assert [o.name for o in pooled.graph.output] == [sig.LAST_LOGITS, "pool_h0_next", "pool_c0_next"]
    onnx.checker.check_model(pooled)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-gru"])
def test_cuda_engine_keeps_state_on_the_device(
    model_repository: Path, oracles: dict[str, Oracle], name: str
) -> None:
    engine = engine_for(model_repository, name, state_on_device=None, device="cuda")
    assert isinstance(engine, DeviceEngine) and engine.providers[0] == "CUDAExecutionProvider"
    assert engine.pool.current(0).device_name().lower() == "cuda"
    slots = np.array([engine.acquire_slot() for _ in range(3)])
    engine.step(slots, np.array([[1, 2], [3, 0], [4, 5]]), np.array([2, 1, 2], np.int32))
    engine.step(slots[:2], np.array([[6], [7]]), np.array([1, 1], np.int32))
    np.testing.assert_allclose(
        engine.last_logits(int(slots[0])), oracles[name].last_logits([1, 2, 6]), atol=1e-4
    )
    np.testing.assert_allclose(
        engine.last_logits(int(slots[1])), oracles[name].last_logits([3, 7]), atol=1e-4
    )
    np.testing.assert_allclose(
        engine.last_logits(int(slots[2])), oracles[name].last_logits([4, 5]), atol=1e-4
    )


@pytest.mark.cuda
def test_fp16_models_run_on_cuda(tmp_path: Path, oracles: dict[str, Oracle]) -> None:
    import torch

    from contract.tokenizer import CharTokenizer
    from export.exporter import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.model import RNNLanguageModel

    tokenizer = CharTokenizer(sorted(set(ALPHABET)))
    torch.manual_seed(0)  # the same weights as tiny-gru, exported in fp16
    model = RNNLanguageModel(
        ModelConfig(arch="gru", vocab_size=tokenizer.vocab_size, embedding_size=8, hidden_size=16)
    )
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, tokenizer.to_dict(), step=0, metrics={})
    version = export_checkpoint(
        checkpoint, tmp_path / "repo", "tiny-gru", precision="fp16", device="cuda"
    ).path
    engine = engine_for(tmp_path / "repo", "tiny-gru", state_on_device=None, device="cuda")
    assert isinstance(engine, DeviceEngine) and engine.manifest.precision == "fp16" and version.name == "1"
    slot = engine.acquire_slot()
    engine.step(np.array([slot]), np.array([[1, 2, 3]]), np.array([3], np.int32))
    np.testing.assert_allclose(
        engine.last_logits(slot), oracles["tiny-gru"].last_logits([1, 2, 3]), atol=2e-2
    )

"""RedisStateStore against a real redis-server on loopback: round trips, TTL, corrupt values, and
Redis going away (stopped, paused) and coming back. Plus the save policy, which needs no Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from serving.ops.metrics import MetricsObserver
from serving.state.records import RecordCorruptError, SessionRecord, encode_record
from serving.state.redis_store import (
    RedisStateStore,
    RedisStoreOptions,
    SavePolicy,
    SaveTracker,
    StateStoreError,
    StateStoreUnavailableError,
    redact_url,
)
from tests.support.redis_server import REDIS_SKIP_REASON, RedisServer, free_port, redis_server_path

SHA = "ab" * 32
FAIL_FAST_S = 1.0  # the bound every call must respect while Redis is away


def make_record(session_id: str, arch: str = "lstm", seed: int = 0, position: int = 3) -> SessionRecord:
    rng = np.random.default_rng(seed)
    names = ("h", "c") if arch == "lstm" else ("h",)
    return SessionRecord(
        session_id=session_id,
        model=f"tiny-{arch}",
        version=2,
        model_sha256=SHA,
        position=position,
        owner="owner-hash" if arch == "lstm" else None,
        last_used=1_700_000_000.5,
        states={name: rng.standard_normal((2, 16), dtype=np.float32) for name in names},
        last_logits=rng.standard_normal(32, dtype=np.float32),
    )


def assert_same(loaded: SessionRecord | None, record: SessionRecord) -> None:
    assert loaded is not None
    assert (loaded.session_id, loaded.model, loaded.version, loaded.model_sha256) == (
        record.session_id,
        record.model,
        record.version,
        record.model_sha256,
    )
    assert (loaded.position, loaded.owner, loaded.last_used) == (
        record.position,
        record.owner,
        record.last_used,
    )
    assert list(loaded.states) == list(record.states)
    for name, array in record.states.items():
        np.testing.assert_array_equal(loaded.states[name], array)
    assert loaded.last_logits is not None and record.last_logits is not None
    np.testing.assert_array_equal(loaded.last_logits, record.last_logits)


class Events:
    """Records what the store reports (the StateStoreEvents protocol)."""

    def __init__(self) -> None:
        self.operations: list[tuple[str, str]] = []
        self.availability: list[bool] = []

    def state_store_operation(self, operation: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.operations.append((operation, outcome))

    def state_store_availability(self, available: bool) -> None:
        self.availability.append(available)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if redis_server_path() is None:
        pytest.skip(REDIS_SKIP_REASON)
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def options(url: str, **overrides: object) -> RedisStoreOptions:
    settings: dict[str, object] = {"url": url, "namespace": "test", "retry_after_s": 0.2}
    settings.update(overrides)
    return RedisStoreOptions(**settings)  # type: ignore[arg-type]


def raw_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, socket_timeout=1.0)


def test_round_trip_lstm_and_gru_records_with_ttl(redis_server: RedisServer) -> None:
    lstm, gru = make_record("a" * 32, "lstm", seed=1), make_record("b" * 32, "gru", seed=2)

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url))
        try:
            await store.save(lstm, ttl_s=60)
            await store.save(gru, ttl_s=1.0)
            assert_same(await store.load(lstm.session_id), lstm)
            assert_same(await store.load(gru.session_id), gru)
            assert store.available and store.failures == 0
        finally:
            await store.close()

    asyncio.run(scenario())
    with raw_client(redis_server) as client:
        assert client.get(f"test:session:{lstm.session_id}") == encode_record(lstm)
        assert 59_000 < int(client.pttl(f"test:session:{lstm.session_id}")) <= 60_000
        assert 0 < int(client.pttl(f"test:session:{gru.session_id}")) <= 1000
        deadline = time.monotonic() + 5
        while client.get(f"test:session:{gru.session_id}") is not None:  # expires with its TTL
            assert time.monotonic() < deadline, "the record did not expire"
            time.sleep(0.05)


def test_missing_key_and_delete(redis_server: RedisServer) -> None:
    record = make_record("c" * 32)
    events = Events()

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url), events)
        try:
            assert await store.load("d" * 32) is None
            assert await store.load("no spaces or /slashes in ids") is None  # no call to Redis
            await store.save(record, ttl_s=60)
            assert await store.delete(record.session_id) is True
            assert await store.delete(record.session_id) is False
            assert await store.load(record.session_id) is None
        finally:
            await store.close()

    asyncio.run(scenario())
    assert events.operations == [
        ("load", "miss"),
        ("load", "miss"),
        ("save", "ok"),
        ("delete", "ok"),
        ("delete", "ok"),
        ("load", "miss"),
    ]
    assert events.availability == [True]  # announced at creation, never down


def test_the_metrics_observer_takes_the_store_events(redis_server: RedisServer) -> None:
    metrics = MetricsObserver(process_metrics=False)

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url), metrics)
        try:
            await store.save(make_record("9" * 32), ttl_s=60)
            assert await store.load("8" * 32) is None
        finally:
            await store.close()

    asyncio.run(scenario())

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("rnnserve_state_store_operations_total", operation="save", outcome="ok") == 1
    assert sample("rnnserve_state_store_operations_total", operation="load", outcome="miss") == 1
    assert sample("rnnserve_state_store_seconds_count", operation="save") == 1
    assert sample("rnnserve_state_store_up") == 1


def test_a_corrupt_value_raises_a_typed_error(redis_server: RedisServer) -> None:
    good = encode_record(make_record("e" * 32))
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x10
    with raw_client(redis_server) as client:
        client.set("test:session:garbage", b"not a record at all")
        client.set("test:session:damaged", bytes(damaged))
        client.set("test:session:truncated", good[:-7])
        client.set("test:session:misfiled", good)  # a valid record under another session's key
    events = Events()

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url), events)
        try:
            for session_id, expected in [
                ("garbage", "not a session record"),
                ("damaged", "checksum mismatch"),
                ("truncated", "checksum mismatch"),
                ("misfiled", f"is for session {'e' * 32}"),
            ]:
                with pytest.raises(RecordCorruptError, match=expected) as caught:
                    await store.load(session_id)
                assert session_id in str(caught.value)
            assert store.available  # a bad value is not an outage
        finally:
            await store.close()

    asyncio.run(scenario())
    assert events.operations == [("load", "corrupt")] * 4


def test_save_many_uses_pipelines_and_keeps_every_record(redis_server: RedisServer) -> None:
    records = [make_record(f"{i:032x}", "gru", seed=i) for i in range(300)]

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url, save_many_chunk=128))
        try:
            assert await store.save_many(iter(records), ttl_s=60) == 300
            for record in (records[0], records[128], records[299]):
                assert_same(await store.load(record.session_id), record)
        finally:
            await store.close()

    asyncio.run(scenario())
    with raw_client(redis_server) as client:
        assert len(client.keys("test:session:*")) == 300


def test_redis_stopped_mid_test_fails_fast_and_recovers_when_restarted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    record = make_record("f" * 32)
    events = Events()
    caplog.set_level(logging.WARNING, logger="serving.state.redis_store")

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url, retry_after_s=0.3, warn_interval_s=60), events)
        try:
            await store.save(record, ttl_s=60)
            redis_server.stop()
            # The first call tries Redis and fails; later calls fail at once without I/O.
            for call in (
                lambda: store.save(record, ttl_s=60),
                lambda: store.load(record.session_id),
                lambda: store.delete(record.session_id),
                lambda: store.save_many([record], ttl_s=60),
            ):
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailableError, match="unavailable") as caught:
                    await call()
                assert time.monotonic() - started < FAIL_FAST_S
                assert redis_server.url.split("//")[1].split("/")[0] in str(caught.value)
            assert not store.available
            assert store.failures == 4
            assert not await store.ping()

            redis_server.start()  # same port, empty (no persistence)
            await asyncio.sleep(0.35)  # past retry_after_s: the next call probes Redis
            await store.save(record, ttl_s=60)
            assert store.available
            assert_same(await store.load(record.session_id), record)
        finally:
            await store.close()

    asyncio.run(scenario())
    assert events.availability == [True, False, True]
    outcomes = [outcome for _, outcome in events.operations]
    assert outcomes == ["ok", "failed", "skipped", "skipped", "skipped", "ok", "ok"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "serving.state.redis_store"]
    # One warning for the outage (rate limited, not one per call) and one for the recovery.
    assert len(warnings) == 2, warnings
    assert "unavailable" in warnings[0] and "available again" in warnings[1]


def test_a_hung_redis_times_out_within_the_bound_then_recovers(redis_server: RedisServer) -> None:
    record = make_record("0" * 32)

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url, socket_timeout_s=0.2, retry_after_s=0.2))
        try:
            await store.save(record, ttl_s=60)  # a pooled connection exists
            redis_server.pause()  # connections are accepted by the kernel, replies never come
            try:
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailableError):
                    await store.load(record.session_id)
                assert time.monotonic() - started < FAIL_FAST_S
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailableError):
                    await store.save(record, ttl_s=60)
                assert time.monotonic() - started < 0.15  # skipped: no wait for the 0.2 s socket timeout
            finally:
                redis_server.resume()
            await asyncio.sleep(0.25)
            assert_same(await store.load(record.session_id), record)
            assert store.available
        finally:
            await store.close()

    asyncio.run(scenario())


def test_no_redis_at_all_fails_fast() -> None:
    port = free_port()  # nothing listens there

    async def scenario() -> None:
        store = RedisStateStore(options(f"redis://127.0.0.1:{port}/0"))
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailableError):
                    await store.load("1" * 32)
                assert time.monotonic() - started < FAIL_FAST_S
            assert not store.available
        finally:
            await store.close()

    asyncio.run(scenario())


def test_an_error_reply_is_a_store_error_not_an_outage(redis_server: RedisServer) -> None:
    with raw_client(redis_server) as client:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # every write is refused with OOM
    events = Events()

    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url), events)
        try:
            with pytest.raises(StateStoreError, match="OutOfMemoryError") as caught:
                await store.save(make_record("2" * 32), ttl_s=60)
            assert not isinstance(caught.value, StateStoreUnavailableError)
            assert store.available
            assert await store.load("2" * 32) is None  # reads still work
        finally:
            await store.close()

    asyncio.run(scenario())
    assert events.operations == [("save", "failed"), ("load", "miss")]


def test_password_is_redacted_from_messages() -> None:
    assert redact_url("redis://:secret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("redis://user:secret@[::1]:6380/1") == "redis://user:***@[::1]:6380/1"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"

    port = free_port()

    async def scenario() -> None:
        store = RedisStateStore(options(f"redis://:hunter2@127.0.0.1:{port}/0"))
        try:
            with pytest.raises(StateStoreUnavailableError) as caught:
                await store.load("3" * 32)
            assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": ""}, "Redis URL is required"),
        ({"namespace": "a b"}, "namespace"),
        ({"socket_timeout_s": 0}, "socket_timeout_s"),
        ({"retry_after_s": float("nan")}, "retry_after_s"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_invalid_options_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options(str(overrides.pop("url", "redis://127.0.0.1:1/0")), **overrides)


def test_ttl_must_be_positive(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStateStore(options(redis_server.url))
        try:
            with pytest.raises(ValueError, match="TTL"):
                await store.save(make_record("4" * 32), ttl_s=0)
        finally:
            await store.close()

    asyncio.run(scenario())


# ----- save policy ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_save_every_step() -> None:
    tracker = SaveTracker(SavePolicy(every_steps=1))
    for _ in range(3):
        assert tracker.stepped("s")
        tracker.saved("s")
    assert len(tracker) == 0


def test_save_every_k_steps() -> None:
    tracker = SaveTracker(SavePolicy(every_steps=3))
    assert [tracker.stepped("s") for _ in range(3)] == [False, False, True]
    tracker.saved("s")
    assert [tracker.stepped("s") for _ in range(3)] == [False, False, True]
    assert not tracker.stepped("other")  # counted per session


def test_save_every_t_seconds_counts_from_the_oldest_unsaved_step() -> None:
    clock = FakeClock()
    tracker = SaveTracker(SavePolicy(every_s=5.0), clock)
    assert not tracker.stepped("s")
    clock.now += 3
    assert not tracker.stepped("s")
    assert tracker.overdue() == []
    clock.now += 2
    assert tracker.overdue() == ["s"]  # due without another step (the periodic sweep)
    assert tracker.stepped("s")
    tracker.saved("s")
    clock.now += 100
    assert tracker.overdue() == []  # nothing unsaved: an idle session is never due
    tracker.stepped("s")
    tracker.forget("s")
    assert len(tracker) == 0


def test_no_periodic_saves_by_default() -> None:
    tracker = SaveTracker(SavePolicy())
    assert not any(tracker.stepped("s") for _ in range(1000))
    assert len(tracker) == 0 and tracker.overdue() == []


def test_policy_limits() -> None:
    policy = SavePolicy(every_steps=4, every_s=2.0)
    assert not policy.due(0, 99.0)
    assert policy.due(4, 0.0) and policy.due(1, 2.0) and not policy.due(3, 1.9)
    with pytest.raises(ValueError, match="every_steps"):
        SavePolicy(every_steps=-1)
    with pytest.raises(ValueError, match="every_s"):
        SavePolicy(every_s=float("inf"))

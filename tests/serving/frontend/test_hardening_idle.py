"""Idle resources are reclaimed: a Stream that sends nothing is ended (its session kept), and one
client address holds a bounded number of health Watch streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.rnnserve.v1 import inference_pb2 as pb
from protos.rnnserve.v1 import inference_pb2_grpc as pb_grpc
from serving.clients.client import error_info
from serving.core.errors import Reason
from serving.frontend.standard_services import peer_address
from tests.support.servers import ServerThread, run

IDLE_S = 0.5


@pytest.mark.parametrize("close_on_disconnect", [False, True])
def test_a_stream_that_sends_nothing_is_ended_and_its_session_kept(
    make_server: Callable[..., ServerThread], close_on_disconnect: bool
) -> None:
    server = make_server(stream_idle_timeout_s=IDLE_S, close_on_disconnect=close_on_disconnect)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            call = stub.Stream(timeout=30)
            await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")))
            opened = await call.read()
            await call.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=[1, 2, 3])))
            assert (await call.read()).prediction.position == 3
            with pytest.raises(grpc.aio.AioRpcError) as idle:  # nothing more sent: the server ends it
                await call.read()
            assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert idle.value.details() == (
                f"the stream sent nothing for {IDLE_S:g} s (--stream-idle-timeout-s); "
                f"session {opened.session_id} stays open: resume it"
            )
            info = error_info(idle.value)
            assert info is not None and info.reason == Reason.STREAM_IDLE.value
            assert dict(info.metadata) == {"sessionId": opened.session_id}
            # The session kept its state: a new stream resumes it where it was.
            resumed = stub.Stream(timeout=30)
            await resumed.write(pb.StreamRequest(resume=pb.ResumeSession(session_id=opened.session_id)))
            assert (await resumed.read()).event == pb.STREAM_EVENT_RESUMED
            await resumed.write(pb.StreamRequest(chunk=pb.TokenChunk(tokens=[4])))
            assert (await resumed.read()).prediction.position == 4
            await resumed.write(pb.StreamRequest(control=pb.CONTROL_END))
            assert (await resumed.read()).event == pb.STREAM_EVENT_ENDED
            await resumed.done_writing()
            # A stream that never sends its first message is ended the same way.
            silent = stub.Stream(timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as never:
                await silent.read()
            assert never.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert str(never.value.details()).startswith("the stream sent nothing for 0.5 s")
            info = error_info(never.value)
            assert info is not None and info.reason == Reason.STREAM_IDLE.value and not info.metadata

    run(scenario())


def test_health_watch_streams_per_client_address_are_capped(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_health_watches_per_peer=3)

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(3)]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            refused = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await refused.read()
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 health Watch streams open, the limit (--max-health-watches-per-peer)" in str(
                over.value.details()
            )
            info = error_info(over.value)
            assert info is not None and info.reason == Reason.HEALTH_WATCH_LIMIT.value
            assert dict(info.metadata) == {"limit": "3"}
            # Check is not limited, and a closed Watch makes room for another.
            checked = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            watches[0].cancel()
            servicer = server.server.health
            for _ in range(500):
                if server.on_loop(lambda: servicer.open_watches("ipv4:127.0.0.1:1")) < 3:
                    break
                await asyncio.sleep(0.01)
            again = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert (await again.read()).status == health_pb2.HealthCheckResponse.SERVING
            for watch in (*watches[1:], again):
                watch.cancel()

    run(scenario())


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:%5B::1%5D:51234", "ipv6:%5B::1%5D"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_peer_addresses_drop_the_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address

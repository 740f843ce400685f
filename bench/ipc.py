"""The IPC channel measured against alternatives: a Unix stream socket with length-prefixed pickle
frames (multiprocessing's Pipe is exactly that; serving/engine/ uses it) against ZeroMQ ipc://
with msgspec MessagePack, and ZeroMQ with pickle.

Each side is a real process pair: an echo process decodes every call of a frame and answers
each one in one frame, as the engine core does. Reported: the round trip of one step call, and
of a batch of 64 step calls in one frame (per batch and per call).

    python -m bench.ipc [--seconds S]
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import zmq

from serving.core.interface import Prediction, SessionRef

RESULT = 0
_encode = msgspec.msgpack.Encoder().encode
_calls = msgspec.msgpack.Decoder(list[tuple[int, str, tuple[SessionRef, list[int]]]])
_answers = msgspec.msgpack.Decoder(list[tuple[int, int, Prediction]])

REF = SessionRef("0123456789abcdef0123456789abcdef", "lstm-seed", 1, 7)
ANSWER = Prediction([5, 9, 2, 1, 0], [-0.1, -2.3, -3.0, -4.1, -4.4], None, None, 12)


def _zmq_echo(address: str) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(address)
    while True:
        identity, frame = socket.recv_multipart()
        if frame == b"stop":
            break
        entries = _calls.decode(frame)
        socket.send_multipart([identity, _encode([(number, RESULT, ANSWER) for number, _, _ in entries])])
    socket.close(linger=0)
    context.term()


def _zmq_pickle_echo(address: str) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(address)
    while True:
        identity, frame = socket.recv_multipart()
        calls = pickle.loads(frame)
        if calls == "stop":
            break
        socket.send_multipart([identity, pickle.dumps([(number, ANSWER) for number, _, _ in calls])])
    socket.close(linger=0)
    context.term()


def _pipe_echo(connection: Connection) -> None:
    while True:
        calls = pickle.loads(connection.recv_bytes())
        if calls == "stop":
            break
        connection.send_bytes(pickle.dumps([(number, ANSWER) for number, _, _ in calls]))


def _measure(round_trip: Callable[[int], None], batch: int, seconds: float) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        round_trip(batch)
        samples.append(time.perf_counter() - start)
    return samples


def measure_zmq(batch: int, seconds: float) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        address = f"ipc://{folder}/bench.sock"
        echo = multiprocessing.get_context("spawn").Process(target=_zmq_echo, args=(address,))
        echo.start()
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.connect(address)

        def round_trip(count: int) -> None:
            socket.send(_encode([(n + 1, "step", (REF, [17])) for n in range(count)]))
            _answers.decode(socket.recv())

        round_trip(1)  # connected
        samples = _measure(round_trip, batch, seconds)
        socket.send(b"stop")
        echo.join()
        socket.close(linger=0)
        context.term()
        return samples


def measure_zmq_pickle(batch: int, seconds: float) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        address = f"ipc://{folder}/bench.sock"
        echo = multiprocessing.get_context("spawn").Process(target=_zmq_pickle_echo, args=(address,))
        echo.start()
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.connect(address)

        def round_trip(count: int) -> None:
            socket.send(pickle.dumps([(n + 1, "step", (REF, [17])) for n in range(count)]))
            pickle.loads(socket.recv())

        round_trip(1)
        samples = _measure(round_trip, batch, seconds)
        socket.send(pickle.dumps("stop"))
        echo.join()
        socket.close(linger=0)
        context.term()
        return samples


def measure_pipe(batch: int, seconds: float) -> list[float]:
    ours, theirs = multiprocessing.Pipe()
    echo = multiprocessing.get_context("spawn").Process(target=_pipe_echo, args=(theirs,))
    echo.start()

    def round_trip(count: int) -> None:
        ours.send_bytes(pickle.dumps([(n + 1, "step", (REF, [17])) for n in range(count)]))
        pickle.loads(ours.recv_bytes())

    round_trip(1)
    samples = _measure(round_trip, batch, seconds)
    ours.send_bytes(pickle.dumps("stop"))
    echo.join()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args(argv)
    rows: list[tuple[str, Any, Any]] = []
    channels = (
        ("zmq ipc + msgspec", measure_zmq),
        ("zmq ipc + pickle", measure_zmq_pickle),
        ("Unix socket (Pipe) + pickle", measure_pipe),
    )
    for name, measure in channels:
        one = statistics.median(measure(1, args.seconds)) * 1e6
        many = statistics.median(measure(64, args.seconds)) * 1e6
        rows.append((name, one, many))
    print("| channel | 1 call round trip p50 | 64 calls in one frame p50 | per call |")
    print("|---|---|---|---|")
    for name, one, many in rows:
        print(f"| {name} | {one:.1f} µs | {many:.1f} µs | {many / 64:.2f} µs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data-parallel training: two CPU processes with gloo keep equal weights, and only rank 0 writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models import distributed
from models.checkpoint import CHECKPOINT_FILE, LAST_WEIGHTS_FILE, WEIGHTS_FILE, load_checkpoint
from models.distributed import DistributedContext, DistributedError

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n" * 10
DIGEST = re.compile(r"\[rank (\d)\] final weights sha256 ([0-9a-f]{64})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_train_args(out: Path, data_path: Path, arch: str) -> list[str]:
    return [
        "--arch", arch, "--preset", "tiny", "--out", str(out), "--data", str(data_path), "--no-progress",
        "--max-steps", "6", "--eval-every", "3", "--seq-len", "16", "--batch-size", "4", "--threads", "1",
    ]  # fmt: skip


def _run_rank(rank: int, world_size: int, port: int, arch: str, data_path: str, root: str) -> None:
    """One rank, as torchrun would start it, writing to its own --out so the test sees who wrote."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    from models import train

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = train.main(tiny_train_args(Path(root) / f"out-rank{rank}", Path(data_path), arch))
    result = {"code": code, "stderr": stderr.getvalue()}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))


def test_two_gloo_ranks_keep_equal_weights_and_only_rank_0_writes(tmp_path: Path) -> None:
    """An LSTM here; the torchrun test below trains a GRU."""
    arch = "lstm"
    data_path = tmp_path / "caesar.txt"
    data_path.write_text(TEXT, encoding="utf-8")
    mp.spawn(_run_rank, args=(2, free_port(), arch, str(data_path), str(tmp_path)), nprocs=2, join=True)

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in results] == [0, 0], results
    digests = {int(match[0]): match[1] for r in results for match in DIGEST.findall(r["stderr"])}
    assert set(digests) == {0, 1}
    assert digests[0] == digests[1]  # the replicas agree after every all-reduced step
    assert (tmp_path / "out-rank0" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "out-rank1").exists()  # rank 1 wrote nothing
    checkpoint = load_checkpoint(tmp_path / "out-rank0")
    assert checkpoint.metrics["world_size"] == 2
    assert checkpoint.training["tokens_seen"] == 2 * 6 * 4 * 16  # both ranks' batches every step
    last = load_checkpoint(tmp_path / "out-rank0", weights_file=LAST_WEIGHTS_FILE)
    assert distributed.weights_digest(last.model) == digests[0]  # what rank 0 saved is what both hold


def test_torchrun_launches_data_parallel_training(tmp_path: Path) -> None:
    """The documented command: torchrun --nproc-per-node 2 -m models.train ..."""
    data_path = tmp_path / "caesar.txt"
    data_path.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "models.train", *tiny_train_args(out, data_path, "gru"),
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(DIGEST.findall(result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], result.stderr[-3000:]
    assert load_checkpoint(out).metrics["world_size"] == 2
    assert (out / WEIGHTS_FILE).is_file()


def test_single_process_context_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.setup("cpu")
    assert context == DistributedContext() and context.is_main and not context.enabled
    model = torch.nn.Linear(3, 2)
    assert distributed.wrap_model(model, context, torch.device("cpu")) is model
    assert distributed.sum_across([1.0, 2.0], context, torch.device("cpu")) == [1.0, 2.0]
    digest = distributed.check_replicas_equal(model, context, torch.device("cpu"))
    assert digest == distributed.weights_digest(model)
    with torch.no_grad():
        model.bias.add_(1.0)
    assert distributed.weights_digest(model) != digest


def test_partial_torchrun_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"):
        distributed.setup("cpu")

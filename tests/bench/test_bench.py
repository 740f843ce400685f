"""`rnnserve bench`: a whole run at tiny sizes, and the parts it is built from."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from bench import cli as bench
from bench import load as bench_load
from bench.echo import canned_prediction, echo_process_main
from bench.engine import quantize_int8
from bench.model import (
    BenchModel,
    BenchModelError,
    ModelSizes,
    copy_model,
    read_model,
    write_synthetic_model,
)
from bench.procs import ServerProcess
from bench.report import compute_targets, write_png
from bench.stats import LatencyStats
from contract import signature as sig
from protos.rnnserve.v1 import inference_pb2 as pb

TINY = ["--vocab-size", "16", "--embedding-size", "8", "--hidden-size", "16"]
# Every scenario, at sizes and durations that keep the whole run to seconds.
TINY_RUN = [
    *TINY,
    *["--duration", "0.2", "--warmup", "0.05", "--streams", "1,64"],
    *["--batch-size", "4", "--prompt-tokens", "16", "--generations", "4", "--generate-tokens", "8"],
    *["--sessions", "200", "--session-concurrency", "16"],
]


@pytest.mark.slow
def test_whole_run_writes_every_section_and_the_png(tmp_path: Path) -> None:
    status = bench.main([*TINY_RUN, "--out", str(tmp_path)])

    results = json.loads((tmp_path / "latest.json").read_text())
    errors = {
        (name, label): figures["error"]
        for name, section in results["scenarios"].items()
        for label, figures in section.items()
        if "error" in figures
    }
    assert errors == {}
    assert status == 0
    assert set(results["models"]) == {"bench-lstm", "bench-gru"}
    assert set(results["scenarios"]) == set(bench.DEFAULT_SCENARIOS)
    for name, section in results["scenarios"].items():
        assert set(section) == ({"echo"} if name == "echo" else {"bench-lstm", "bench-gru"}), name
    for label in ("bench-lstm", "bench-gru"):
        engine = results["scenarios"]["engine"][label]
        assert engine["batch1_step"]["p50_us"] > 0
        assert engine["batch_step"]["batch_size"] == 4
        assert engine["int8_batch1_step"]["speedup_vs_fp32"] > 0
        for scenario in ("stream", "unbatched"):
            sweep = results["scenarios"][scenario][label]["sweep"]
            assert [point["streams"] for point in sweep] == [1, 64]
            assert all(point["messages"] > 0 and point["p99_us"] >= point["p50_us"] > 0 for point in sweep)
        prompt = results["scenarios"]["prompt"][label]
        assert prompt["point"]["tokens"] == 16 * prompt["point"]["messages"]
        assert results["scenarios"]["generate"][label]["point"]["tokens"] > 0
        sessions = results["scenarios"]["sessions"][label]
        assert sessions["sessions"] == 200
        assert sessions["state_bytes"] == 200 * results["models"][label]["state_bytes_per_session"]
        assert sessions["rss_after_step_bytes"] > 0
    assert [point["streams"] for point in results["scenarios"]["echo"]["echo"]["sweep"]] == [1, 64]

    measured = [t for t in results["targets"] if t["verdict"] in ("met", "missed")]
    assert len(measured) == 2 * 6  # six comparable targets per model; int8 is reported only
    assert (tmp_path / "latest.md").read_text().count("| bench-lstm |") >= 6
    png = Path(results["outputs"]["png"])
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "latest.png").is_file()


def test_synthetic_model_is_a_loadable_repository_version(tmp_path: Path) -> None:
    sizes = ModelSizes(vocab_size=12, embedding_size=8, hidden_size=16, num_layers=2)
    model = write_synthetic_model(tmp_path, "bench-lstm", "lstm", sizes, seed=3)

    config = json.loads((tmp_path / "bench-lstm" / "1" / sig.CONFIG_FILE).read_text())
    assert config["format"] == "rnnserve-model/1"
    assert (config["arch"], config["hidden_size"], config["num_layers"]) == ("lstm", 16, 2)
    assert config["tokenizer"] == {"type": "ids", "vocab_size": 12}
    assert model.state_bytes_per_session == 2 * 2 * 16 * 4
    assert not list((tmp_path / "bench-lstm").glob(".tmp-*"))

    session = ort.InferenceSession(str(model.model_file), providers=["CPUExecutionProvider"])
    zeros = np.zeros((3, 2, 16), dtype=np.float32)
    outputs = session.run(
        [sig.LAST_LOGITS, sig.HN],
        {
            sig.TOKENS: np.ones((3, 5), dtype=np.int64),
            sig.LENGTHS: np.array([5, 2, 1], dtype=np.int32),
            sig.H0: zeros,
            sig.C0: zeros,
        },
    )
    assert outputs[0].shape == (3, 12) and outputs[1].shape == (3, 2, 16)


def test_real_models_are_copied_by_name_and_version(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_synthetic_model(source, "tiny-gru", "gru", ModelSizes(16, 8, 16, 1), seed=0)

    copied = copy_model(source, "tiny-gru", tmp_path / "copy")
    assert (copied.name, copied.version, copied.arch) == ("tiny-gru", 1, "gru")
    assert read_model(tmp_path / "copy" / "tiny-gru" / "1") == copied
    with pytest.raises(BenchModelError, match="no complete version"):
        copy_model(source, "missing", tmp_path / "other")
    with pytest.raises(BenchModelError, match="positive version"):
        copy_model(source, "tiny-gru:latest", tmp_path / "other")


def _publish_int8(repository: Path, fp32: BenchModel, name: str, val_loss: float) -> None:
    """An int8 export of FP32 as `rnnserve export --precision int8` would publish it."""
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    quantized = quantize_int8(fp32, repository.parent / "quantized")
    shutil.copyfile(quantized.model_file, version_dir / sig.MODEL_FILE)
    config = json.loads((fp32.path / sig.CONFIG_FILE).read_text())
    config.update(name=name, precision="int8", metrics={"val_loss": val_loss, "val_loss_fp32": 2.0})
    (version_dir / sig.CONFIG_FILE).write_text(json.dumps(config))


def test_exported_models_and_their_int8_variant_are_benchmarked(tmp_path: Path) -> None:
    source = tmp_path / "repository"
    fp32 = write_synthetic_model(source, "tiny-lstm", "lstm", ModelSizes(16, 8, 16, 1), seed=0)
    _publish_int8(source, fp32, "tiny-lstm-int8", val_loss=2.25)
    argv = ["--repository", str(source), "--model", "tiny-lstm:1", "--int8-model", "tiny-lstm-int8"]
    argv += ["--scenarios", "engine", "--duration", "0.05", "--batch-size", "2", "--prompt-tokens", "4"]

    assert bench.main([*argv, "--out", str(tmp_path / "out"), "--no-png"]) == 0

    results = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert list(results["models"]) == ["tiny-lstm"]
    int8 = results["scenarios"]["engine"]["tiny-lstm"]["int8_batch1_step"]
    assert (int8["val_loss"], int8["val_loss_fp32"]) == (2.25, 2.0)
    assert results["outputs"]["png"] is None and not list((tmp_path / "out").glob("*.png"))
    reported = [t for t in results["targets"] if t["key"] == "int8"]
    assert len(reported) == 1 and "val loss 2.2500" in reported[0]["detail"]


def test_echo_server_answers_with_prediction_shaped_replies() -> None:
    default = canned_prediction(pb.PredictionOptions(), vocab_size=16)
    assert len(default.top_ids) == len(default.top_logprobs) == 5
    full = canned_prediction(
        pb.PredictionOptions(top_k=3, return_logits=True, sampling=pb.SamplingOptions()), vocab_size=16
    )
    assert len(full.top_ids) == 3 and len(full.logits) == 16 and full.HasField("sampled_token")

    async def load(address: str) -> Any:
        async with bench_load.open_channel(address) as channel:
            return await bench_load.stream_load(
                channel, model="echo", vocab_size=16, streams=3, tokens_per_message=1, warmup_s=0.05,
                duration_s=0.2, seed=0,
            )  # fmt: skip

    with ServerProcess("echo server", echo_process_main, ("127.0.0.1", 16), "127.0.0.1") as server:
        point = asyncio.run(load(server.address))
        resident = server.resident_bytes()
    if sys.platform == "linux":
        assert resident is not None and resident > 2**20
    assert point.streams == 3 and point.messages == point.tokens > 0
    assert point.latency.count == point.messages
    assert 0 < point.latency.p50_us <= point.latency.p99_us <= point.latency.max_us


def _figures(p50: float, rate: float, streams: int = 1) -> dict[str, Any]:
    return {
        "streams": streams,
        "p50_us": p50,
        "p99_us": 2 * p50,
        "messages_per_s": rate,
        "tokens_per_s": rate,
    }


def test_targets_compare_the_issue_ratios() -> None:
    results = {
        "meta": {"config": {"generations": 64, "batch_size": 64, "prompt_tokens": 256, "sessions": 100_000}},
        "models": {"m": {}},
        "scenarios": {
            "engine": {
                "m": {
                    "batch1_step": {"p50_us": 200.0},
                    "batch_step": {"batch_size": 64, "tokens_per_s": 20_000.0},
                    "prompt": {"tokens_per_s_p50": 10_000.0},
                    "int8_batch1_step": {
                        "p50_us": 100.0,
                        "speedup_vs_fp32": 2.0,
                        "val_loss": None,
                        "val_loss_fp32": None,
                    },
                }
            },
            "echo": {"echo": {"sweep": [_figures(100.0, 5_000.0), _figures(900.0, 10_000.0, 64)]}},
            "stream": {"m": {"sweep": [_figures(360.0, 2_500.0), _figures(1_000.0, 9_000.0, 64)]}},
            "unbatched": {"m": {"sweep": [_figures(400.0, 2_000.0), _figures(5_000.0, 3_500.0, 64)]}},
            "prompt": {"m": {"point": _figures(30_000.0, 8_000.0), "tokens_per_s_p50": 6_000.0}},
            "generate": {"m": {"error": "LoadError: the server answered UNIMPLEMENTED"}},
            "sessions": {"m": {"sessions": 100_000, "growth_bytes": 500 * 2**20, "state_bytes": 400 * 2**20}},
        },
    }
    targets = {target.key: target for target in compute_targets(results)}
    assert list(targets) == [
        "single_stream",
        "streams64_vs_echo",
        "streams64_vs_unbatched",
        "generate",
        "prompt",
        "idle_sessions",
        "int8",
    ]
    expected = {
        "single_stream": (360 / (100 + 200), "met"),
        "streams64_vs_echo": (0.9, "met"),
        "streams64_vs_unbatched": (9_000 / 3_500, "missed"),
        "prompt": (0.6, "missed"),
        "idle_sessions": (1.25, "met"),
        "int8": (2.0, "reported"),
    }
    for key, (ratio, verdict) in expected.items():
        assert (targets[key].ratio, targets[key].verdict) == (pytest.approx(ratio), verdict), key
    assert (targets["generate"].ratio, targets["generate"].verdict) == (None, "not measured")


def test_png_is_skipped_with_a_message_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert write_png({"scenarios": {}}, tmp_path / "out.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "0.0.0.0"], "not a loopback address"),
        (["--model", "m"], "--repository and --model go together"),
        (["--scenarios", "stream,nope"], "unknown scenario"),
        (["--streams", "1,0"], "positive integers"),
        (["--duration", "0"], "--duration must be positive"),
        (["--server-option", "max_batch_size"], "KEY=VALUE"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_config(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_shortens_defaults_but_explicit_flags_win() -> None:
    quick = bench.parse_config(["--quick", "--sessions", "500"])
    assert (quick.duration_s, quick.warmup_s, quick.sessions) == (1.0, 0.5, 500)
    assert quick.scenarios == bench.DEFAULT_SCENARIOS
    assert bench.parse_config(["--scenarios", "sessions,engine"]).scenarios == ("engine", "sessions")


def test_server_options_become_typed_settings(tmp_path: Path) -> None:
    from bench.server import ServerOptionError, make_settings

    settings = make_settings(
        tmp_path,
        "127.0.0.1",
        "cpu",
        {"max_batch_size": "1", "max_queue_delay_ms": "0.5", "close_on_disconnect": "true"},
    )
    assert (settings.max_batch_size, settings.max_queue_delay_ms, settings.close_on_disconnect) == (
        1,
        0.5,
        True,
    )
    assert settings.port == 0
    with pytest.raises(ServerOptionError, match="unknown server option"):
        make_settings(tmp_path, "127.0.0.1", "cpu", {"max_batch": "1"})
    with pytest.raises(ServerOptionError, match="expected int"):
        make_settings(tmp_path, "127.0.0.1", "cpu", {"max_batch_size": "many"})


def test_latency_stats_refuse_an_empty_window() -> None:
    stats = LatencyStats.from_ns([1_000, 2_000, 3_000, 4_000])
    assert (stats.count, stats.p50_us, stats.max_us) == (4, 2.5, 4.0)
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.from_ns([])

"""Profiling: `--profile` traces hold the chosen stages or steps and their stage, step and block ranges; the
engine's profile windows; NVTX ranges from the same seams; bad settings name their flag; nothing is recorded
outside a window."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from ditserve import Engine
from ditserve.cli import main
from ditserve.config import ConfigError, EngineArgs
from ditserve.utils import profiling

REQUEST = dict(prompt="a fox", height=32, width=32, num_inference_steps=3, seed=1)


def ranges(trace: Path) -> Counter:
    """The trace's named ranges (torch.profiler's user annotations) and how often each occurs."""
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return Counter(e["name"] for e in events if e.get("cat") == "user_annotation")


@pytest.fixture(scope="module")
def engine(tiny_dev):
    return Engine.from_pretrained(str(tiny_dev))


def test_cli_traces_only_the_steps_asked_for(tiny_dev, tmp_path, capsys):
    out = tmp_path / "traces"
    argv = ["generate", "--model", str(tiny_dev), "--prompt", "a fox", "--height", "32", "--width", "32"]
    argv += ["--num-inference-steps", "4", "--output", str(tmp_path / "a.png"), "--profile", str(out)]
    assert main([*argv, "--profile-steps", "1:3"]) == 0
    (trace,) = sorted(out.iterdir())  # steps given, no stage named: the steps' window alone
    assert trace.name == "000-steps-1-3.rank0.json" and f"profile: {trace}" in capsys.readouterr().out
    names = ranges(trace)
    assert names["step 1"] == names["step 2"] == 1 and "step 0" not in names and "step 3" not in names
    # tiny-dev: 1 double block, glue, 2 single blocks; one forward a step (no true CFG).
    assert names["block 0"] == names["block 1"] == names["block 2"] == names["glue"] == 2
    assert not any(name.startswith("stage:") for name in names)


def test_stage_windows_and_a_session_per_block(engine, tmp_path):
    with engine.profile(tmp_path, stages="encode,denoise") as session:
        engine.generate(**REQUEST)
        engine.generate(**REQUEST)  # each request writes its own windows
    labels = [p.name.split("-", 1)[1] for p in session.traces]
    assert labels == ["stage-encode.rank0.json", "stage-denoise.rank0.json"] * 2
    assert all(p.is_file() for p in session.traces)
    denoise = ranges(session.traces[1])
    assert denoise["stage:denoise"] == 1 and [denoise[f"step {i}"] for i in range(3)] == [1, 1, 1]
    assert "stage:encode" in ranges(session.traces[0]) and "step 0" not in ranges(session.traces[0])
    assert profiling.current() is None and not profiling.ranges_on


def test_a_window_past_the_last_step_closes_with_the_stage(engine, tmp_path):
    with engine.profile(tmp_path, steps="2:10") as session:
        engine.generate(**REQUEST)
    (trace,) = session.traces
    names = ranges(trace)
    assert names["step 2"] == 1 and "step 1" not in names


def test_bad_settings_name_their_flag_or_field(engine, tmp_path, capsys):
    base = ["generate", "--prompt", "x", "--output", str(tmp_path / "x.png")]
    for extra, flag in (
        (["--profile", str(tmp_path), "--profile-steps", "3:1"], "--profile-steps"),
        (["--profile", str(tmp_path), "--profile-steps", "two"], "--profile-steps"),
        (["--profile", str(tmp_path), "--profile-stages", "encode,render"], "--profile-stages"),
        (["--profile", str(tmp_path), "--profile-stages", "encode", "--profile-steps", "0:1"], "--profile-steps"),
        (["--profile-steps", "0:2"], "--profile"),
    ):
        assert main(base + extra) == 2
        assert flag in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*base, "--profile", str(tmp_path / "file")]) == 2
    with pytest.raises(ConfigError) as info:
        engine.start_profile(str(tmp_path), steps="1:1")
    assert info.value.field == "steps"
    engine.start_profile(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="already running") as info:
            engine.start_profile(str(tmp_path))
        assert info.value.field == "profile"
    finally:
        assert engine.stop_profile() == {"profiling": False, "traces": []}  # nothing ran: nothing written
    assert engine.stop_profile() == {"profiling": False, "traces": []}


def test_nvtx_ranges_come_from_the_same_seams(engine, monkeypatch):
    with pytest.raises(ConfigError) as info:
        Engine(EngineArgs(nvtx=True, device="cpu"))
    assert info.value.field == "nvtx"
    pushed: list[str] = []
    depth = [0]

    def push(name):
        pushed.append(name)
        depth[0] += 1

    def pop():
        depth[0] -= 1

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", push)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", pop)
    monkeypatch.setattr(profiling, "_nvtx", True)
    profiling._update()
    try:
        engine.generate(**REQUEST)
    finally:
        monkeypatch.setattr(profiling, "_nvtx", False)
        profiling._update()
    assert depth[0] == 0
    names = Counter(pushed)
    assert [names[f"stage:{s}"] for s in profiling.STAGES] == [1, 1, 1, 1]
    assert [names[f"step {i}"] for i in range(3)] == [1, 1, 1] and names["block 2"] == 3


def test_no_ranges_outside_a_window(engine, monkeypatch):
    def no_range(name):
        raise AssertionError(f"a range ({name}) was recorded with no profile running")

    monkeypatch.setattr(torch.profiler, "record_function", no_range)
    engine.generate(**REQUEST)

"""bench/flashhead_gpu.py keeps working: its tiny CPU mode runs in CI (the GPU run needs a GPU)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from bench import flashhead_gpu


def test_tiny_mode_measures_the_stages_of_a_streams_chunks(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--chunks", "1", "--warmup", "0", "--max-streams", "2", "--target-fps", "0.1"]
    rows = flashhead_gpu.main([*argv, "--modes", "eager,cudagraphs,tensorrt", "--json", str(out)])
    assert torch.get_num_threads() == threads
    eager, graphs, trt = rows
    assert (eager.model, eager.mode, eager.size, eager.new_frames) == ("pro", "eager", "64x64", 28)
    assert set(eager.stage_ms) == set(flashhead_gpu.STAGES) and all(v > 0 for v in eager.stage_ms.values())
    assert eager.step_ms is not None and math.isclose(eager.step_ms, eager.stage_ms["dit_step"] / 4)
    assert (
        eager.chunk_ms is not None
        and eager.fps is not None
        and math.isclose(eager.fps, 28 / (eager.chunk_ms / 1000))
    )
    assert eager.first_frame_s is not None and math.isclose(
        eager.first_frame_s, 28 / 25 + eager.chunk_ms / 1000
    )
    assert (
        eager.tflops_per_step is not None and eager.tflops_per_step > 0 and eager.mfu is None
    )  # no GPU peak
    assert set(eager.stream_fps) == {1, 2} and eager.streams_at_25 == 2  # two streams ran, each at >= 0.1 fps
    assert eager.reference_encode_ms is not None and eager.weights_gb is not None and eager.weights_gb > 0.5
    assert graphs.note == "skipped: CUDA graphs need a GPU" and "no --trt-engines" in trt.note
    assert json.loads(out.read_text())["rows"][0]["mode"] == "eager"
    assert "| pro | eager |" in capsys.readouterr().out


def test_bad_arguments_are_named() -> None:
    with pytest.raises(SystemExit, match="unknown"):
        flashhead_gpu.main(["--tiny", "--modes", "fast"])
    with pytest.raises(SystemExit, match="WIDTHxHEIGHT"):
        flashhead_gpu.main(["--tiny", "--size", "big"])
    with pytest.raises(SystemExit, match=r"--models: unknown \['medium'\]"):
        flashhead_gpu.main(["--tiny", "--models", "medium"])

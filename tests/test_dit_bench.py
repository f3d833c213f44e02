"""bench/dit_gpu.py keeps working: its tiny CPU mode runs in CI."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from bench import dit_gpu


def test_tiny_mode_measures_steps_flops_and_real_time_factor(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "rows.json"
    rows = dit_gpu.main(["--tiny", "--frames", "8", "--iters", "2", "--json", str(out)])
    assert torch.get_num_threads() == threads
    assert [(r.size, r.mode) for r in rows] == [("64x64", "eager"), ("64x96", "eager")]
    for r in rows:
        assert r.latent_frames == 3 and r.step_ms > 0 and len(r.step_samples_ms) == 2
        assert r.tflops_per_step > 0 and r.mfu is None  # no GPU peak on CPU
        assert math.isclose(r.rtf_dit, (8 / 25) / (4 * r.step_ms / 1000))
        assert r.rtf_clip is not None and r.vae_ms is not None and r.rtf_clip < r.rtf_dit
    assert rows[1].tflops_per_step > rows[0].tflops_per_step  # more tokens, more work
    assert json.loads(out.read_text())["rows"][0]["size"] == "64x64"
    assert "| 64x96 | eager |" in capsys.readouterr().out


def test_peak_lookup_and_bad_arguments() -> None:
    assert dit_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert dit_gpu.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert dit_gpu.peak_tflops("Some Future GPU") is None
    with pytest.raises(SystemExit, match="HEIGHTxWIDTH"):
        dit_gpu.main(["--tiny", "--sizes", "big"])
    with pytest.raises(SystemExit, match="unknown mode"):
        dit_gpu.main(["--tiny", "--modes", "fast", "--no-vae", "--iters", "1"])

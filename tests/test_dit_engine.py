"""The dit engine through the engine contract, on the tiny random preset (CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engines.base import AUDIO_RATE, AudioSlice, Avatar, Keyframe
from engines.dit import DitEngine, build_dit_engine
from engines.dit.conditioning import (
    FEATURE_RATE,
    audio_span,
    latent_frame_centres,
    window_features,
)
from engines.dit.engine import shot_prompt
from engines.storyline import Emotion, EmotionLabel, Shot, Window, default_shot
from realtime.clock import FakeClock, InlineExecutor
from realtime.events import WindowPlanned
from realtime.playout import Playout
from realtime.scheduler import CascadeScheduler, SchedulerConfig
from realtime.timeline import AudioTimeline

FPS = 25
STEP = 4 / FPS  # keyframes four frames apart: one latent frame per interval


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny convolutions are dominated by thread hand-off on a loaded 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine() -> DitEngine:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        eng = build_dit_engine(None, random_weights=True, dtype="fp32", config="tiny")
        adapter = eng.parts.subclip.adapter
        assert adapter is not None
        for block in adapter.blocks:  # as if trained, so audio reaches the frames
            block.to_out.weight.data = torch.randn_like(block.to_out.weight) * 0.5
    return eng


def portrait() -> Avatar:
    rng = np.random.default_rng(0)
    return Avatar("a", (rng.random((90, 70, 3)) * 255).astype(np.uint8))


def speech(seconds: float, seed: int = 1, start: float = 0.0) -> AudioSlice:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * AUDIO_RATE)) / AUDIO_RATE
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return AudioSlice(start=start, samples=(wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32))


def test_stage_shapes(engine: DitEngine) -> None:
    prepared = engine.prepare(portrait())
    assert prepared.image.shape == (64, 64, 3) and prepared.latent.shape == (1, 4, 1, 8, 8)
    keys = engine.keyframes(prepared, [default_shot(0, 1)], [0.0, STEP, 2 * STEP])
    assert [k.pts for k in keys] == [0.0, STEP, 2 * STEP]
    assert all(k.image is not None and k.image.shape == (64, 64, 3) for k in keys)
    assert all(k.state.latent.shape == (1, 4, 1, 8, 8) for k in keys)
    for first, last, n in ((keys[0], keys[1], 4), (keys[0], keys[2], 8)):
        frames = engine.subclip(prepared, first, last, [speech(1.0)], [default_shot(0, 1)])
        assert len(frames) == n + 1 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
        assert np.array_equal(frames[0], first.image) and np.array_equal(frames[-1], last.image)
    odd = Keyframe(pts=7 / FPS, state=None, image=keys[1].image)  # 7 frames: not 1 + 4k
    assert len(engine.subclip(prepared, keys[0], odd, [speech(1.0)], [default_shot(0, 1)])) == 8
    up = engine.upscale(frames)
    assert len(up) == len(frames) and all(f.shape == (128, 128, 3) for f in up)
    assert engine.size == (128, 128) and engine.fps == FPS


def test_keyframes_follow_reference_and_prompts(engine: DitEngine) -> None:
    prepared = engine.prepare(portrait())
    calm = Shot(start=0, end=1, prompt="a calm host")
    base = engine.keyframes(prepared, [calm], [0.0, STEP])
    again = engine.keyframes(prepared, [calm], [0.0, STEP])
    assert all(np.array_equal(a.image, b.image) for a, b in zip(base, again, strict=True))
    excited = engine.keyframes(prepared, [calm.model_copy(update={"prompt": "an excited host"})], [0.0, STEP])
    assert not np.array_equal(base[1].image, excited[1].image)
    other = Avatar("a", np.full((64, 64, 3), 200, np.uint8))
    moved = engine.keyframes(engine.prepare(other), [calm], [0.0, STEP])
    assert not np.array_equal(base[1].image, moved[1].image)


def test_first_last_frame_conditioning_reaches_the_subclip(engine: DitEngine) -> None:
    prepared = engine.prepare(portrait())
    keys = engine.keyframes(prepared, [default_shot(0, 1)], [0.0, STEP])
    audio, shot = speech(1.0), default_shot(0, 1)
    base = engine.subclip(prepared, keys[0], keys[1], [audio], [shot])
    other_last = Keyframe(pts=STEP, state=None, image=255 - keys[1].image)
    changed = engine.subclip(prepared, keys[0], other_last, [audio], [shot])
    assert any(not np.array_equal(a, b) for a, b in zip(base[1:-1], changed[1:-1], strict=True))
    louder = engine.subclip(prepared, keys[0], keys[1], [speech(1.0, seed=9)], [shot])
    assert any(not np.array_equal(a, b) for a, b in zip(base[1:-1], louder[1:-1], strict=True))


def test_silent_character_with_zero_mask_cannot_change_frames(engine: DitEngine) -> None:
    prepared = engine.prepare(portrait())
    keys = engine.keyframes(prepared, [default_shot(0, 1)], [0.0, STEP])
    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, :, :32] = 1.0  # character 0 is on the left; character 1's mask is empty
    shot = default_shot(0, 1)

    def run(a0: AudioSlice, a1: AudioSlice) -> list[np.ndarray]:
        res = engine.subclip_multi(prepared, keys[0], keys[1], [a0, a1], shot, masks=masks)
        assert res.masks is not None and res.masks.shape == (2, 2, 4, 4)
        return res.frames

    base = run(speech(1.0, 1), speech(1.0, 2))
    assert all(np.array_equal(a, b) for a, b in zip(base, run(speech(1.0, 1), speech(1.0, 3)), strict=True))
    assert any(
        not np.array_equal(a, b) for a, b in zip(base, run(speech(1.0, 4), speech(1.0, 2)), strict=True)
    )
    predicted = engine.subclip_multi(prepared, keys[0], keys[1], [speech(1.0, 1), speech(1.0, 2)], shot)
    assert predicted.masks is not None and predicted.masks.shape == (2, 2, 4, 4)
    assert np.all((predicted.masks >= 0) & (predicted.masks <= 1))
    with pytest.raises(ValueError, match="audio tracks"):
        engine.subclip_multi(prepared, keys[0], keys[1], [speech(1.0)] * 3, shot)


async def test_tiny_cascade_through_the_scheduler(engine: DitEngine) -> None:
    # Known (TTS) audio for 0.48 s: the scheduler plans keyframes, renders the three
    # 4-frame sub-clips that audio covers and upscales them; playout gets 12 frames.
    prepared = engine.prepare(portrait())
    shots = [
        Shot(start=0, end=2 * STEP, prompt="a calm host"),
        Shot(start=2 * STEP, end=5, emotion=Emotion(label=EmotionLabel.happy, intensity=0.8)),
    ]
    timeline = AudioTimeline(horizon_s=20)
    samples = speech(3 * STEP).samples
    timeline.write_tts(0.0, samples, np.zeros(3 * len(samples), np.int16), [], now=0.0)
    playout = Playout(FPS, 0.2)
    sched = CascadeScheduler(
        engine,
        prepared,
        timeline,
        FakeClock(),
        playout,
        InlineExecutor(),
        SchedulerConfig(subclip_frames=4, workers=1, delay_s=0.2),
    )
    sched.inbox.post(WindowPlanned(Window(start=0, end=5, shots=shots), 0))
    task = asyncio.ensure_future(sched.run())
    try:
        for _ in range(200):
            if sched.stats.clips_rendered == 3:
                break
            await asyncio.sleep(0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sched.stats.clips_rendered == 3 and playout.buffered() == 12
    idle = np.zeros((128, 128, 3), np.uint8)
    frames = [playout.take(k, idle) for k in range(12)]
    assert all(fresh and f.shape == (128, 128, 3) and f.dtype == np.uint8 for f, fresh in frames)
    assert len({f.tobytes() for f, _ in frames}) > 1  # real frames, not one held image


def test_the_scheduler_never_asks_the_dit_engine_for_frames_it_would_throw_away(engine: DitEngine) -> None:
    # the VAE codes video four frames at a time: one-frame sub-clips (the server's default)
    # would generate four and keep one, so the scheduler asks for the engine's minimum
    assert engine.min_subclip_frames == engine.codec.temporal == 4
    sched = CascadeScheduler(engine, None, AudioTimeline(horizon_s=5), FakeClock(), Playout(FPS, 0.2),
                             InlineExecutor(), SchedulerConfig(subclip_frames=1, delay_s=0.2))
    assert sched.n == 4 and sched.clip_s == pytest.approx(4 / FPS)


def test_bad_calls_are_rejected(engine: DitEngine) -> None:
    prepared = engine.prepare(portrait())
    with pytest.raises(ValueError, match="RGB uint8"):
        engine.prepare(Avatar("b", np.zeros((10, 10), np.uint8)))
    with pytest.raises(ValueError, match="increase"):
        engine.keyframes(prepared, [], [0.2, 0.1])
    key = Keyframe(pts=0.0, state=None, image=prepared.image)
    with pytest.raises(ValueError, match="whole number"):
        engine.subclip(
            prepared,
            key,
            Keyframe(pts=0.01, state=None, image=prepared.image),
            [speech(1.0)],
            [default_shot(0, 1)],
        )
    with pytest.raises(ValueError, match="no image"):
        engine.subclip(prepared, key, Keyframe(pts=STEP, state=None), [speech(1.0)], [default_shot(0, 1)])
    with pytest.raises(ValueError, match="upscale takes 64x64"):
        engine.upscale([np.zeros((32, 32, 3), np.uint8)])


def test_bf16_engine_runs(engine: DitEngine) -> None:
    half = build_dit_engine(None, random_weights=True, dtype="bf16", config="tiny")
    prepared = half.prepare(portrait())
    keys = half.keyframes(prepared, [default_shot(0, 1)], [0.0, STEP])
    frames = half.subclip(prepared, keys[0], keys[1], [speech(1.0)], [default_shot(0, 1)])
    assert len(frames) == 5 and half.parts.subclip.backbone.proj_out.weight.dtype == torch.bfloat16


def test_audio_windows_per_latent_frame() -> None:
    centres = latent_frame_centres(1.0, 1.32, 9, 4)  # 9 frames at 25 fps: latent frames 0, 1-4, 5-8
    assert np.allclose(centres, [1.0, 1.0 + 2.5 / 25, 1.0 + 6.5 / 25])
    with pytest.raises(ValueError, match="1 \\+ 4"):
        latent_frame_centres(0, 1, 8, 4)
    feats = torch.arange(10, dtype=torch.float32)[:, None]  # feature k at 0.5 + k / 50
    win = window_features(feats, 0.5, np.array([0.5, 0.6, 0.7]), 3)
    assert win[:, :, 0].tolist() == [[0, 0, 1], [4, 5, 6], [9, 0, 0]]  # zeros outside
    t0, t1 = audio_span(centres, 12)
    assert t0 <= centres[0] - 6 / FEATURE_RATE and t1 >= centres[-1] + 6 / FEATURE_RATE


def test_shot_prompt_uses_the_plan() -> None:
    assert shot_prompt(Shot(start=0, end=1, prompt="custom")) == "custom"
    composed = shot_prompt(Shot(start=0, end=1, emotion=Emotion(label=EmotionLabel.sad, intensity=0.5)))
    assert "sad" in composed and "close up" in composed


def test_cfg_with_the_negative_directors_prompts(engine: DitEngine) -> None:
    from dataclasses import replace

    cfg = engine.parts.config.model_copy(update={"guidance_scale": 3.0})
    guided = DitEngine(replace(engine.parts, config=cfg))
    prepared = guided.prepare(portrait())
    shots = [
        Shot(start=0, end=STEP, prompt="a calm host", negative_prompt="blurry"),
        Shot(start=STEP, end=1, prompt="a smiling host"),
    ]
    keys = guided.keyframes(prepared, shots, [0.0, STEP])
    other = [shots[0].model_copy(update={"negative_prompt": "distorted mouth"}), shots[1]]
    assert not np.array_equal(keys[1].image, guided.keyframes(prepared, other, [0.0, STEP])[1].image)
    frames = guided.subclip(prepared, keys[0], keys[1], [speech(1.0)], [shots[0]])
    assert len(frames) == 5

"""The ``flashhead`` engine through the engine contract: a random published-layout checkpoint on CPU.

The tiny Pro layout (two DiT layers, a narrow Wan VAE, wav2vec2 with base's
12 x 768 layers) runs at 64x64. Random weights make no face; what is tested
is what reaches the model and what the stream is made of: the plan in the
reference and motion latents the DiT gets, the audio in the frames, chunks
that continue one another through the keyframes they share, and clear
errors for what cannot start.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from engines.base import AUDIO_RATE, AudioSlice, Avatar, Keyframe
from engines.dit.flashhead import ChunkSettings, FlashHead
from engines.dit.flashhead.engine import (
    ChunkKeyframe,
    FlashHeadEngine,
    build_flashhead_engine,
    reference_controls,
    rig_size,
)
from engines.face import analyse_face, brow_height, mouth_corner_lift
from engines.registry import create_engine
from engines.storyline import Emotion, EmotionLabel, GazeTarget, Gesture, GestureKind, Shot, default_shot
from realtime.clock import FakeClock, InlineExecutor
from realtime.events import WindowPlanned
from realtime.playout import Playout
from realtime.scheduler import CascadeScheduler, SchedulerConfig
from realtime.timeline import AudioTimeline
from tests.flashhead_layout import tone, write_published_layout
from tests.helpers import astronaut

FPS = 25
N = 28  # new frames per Pro chunk
CLIP = N / FPS


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("published")
    return write_published_layout(root), root / "wav2vec2-base-960h"


@pytest.fixture(scope="module")
def engine(layout: tuple[pathlib.Path, pathlib.Path]) -> FlashHeadEngine:
    weights, wav2vec = layout
    return build_flashhead_engine(
        weights, wav2vec=wav2vec, device="cpu", dtype="fp32", size=(64, 64)
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(engine: FlashHeadEngine) -> object:
    return engine.prepare(Avatar("astronaut", astronaut()))


def shot(label: EmotionLabel = EmotionLabel.neutral, **kw: object) -> Shot:
    return Shot(start=0, end=60, emotion=Emotion(label=label, intensity=1.0), **kw)  # type: ignore[arg-type]


def voice(seconds: float, start: float = 0.0, hz: float = 200.0) -> AudioSlice:
    """A syllable-like tone (4 Hz envelope) from ``start``, with 0.3 s of context before."""
    x = tone(seconds + 0.3, hz=hz)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(len(x)) / AUDIO_RATE)
    return AudioSlice(start=start - 0.3, samples=(x * envelope).astype(np.float32))


def silence(seconds: float, start: float = 0.0) -> AudioSlice:
    return AudioSlice(start=start - 0.3, samples=np.zeros(int((seconds + 0.3) * AUDIO_RATE), np.float32))


class Spy:
    """Records what the DiT is given at its first step of each chunk: motion latent and reference."""

    def __init__(self, fh: FlashHead) -> None:
        self.fh = fh
        self.inner: Callable[..., torch.Tensor] = fh.forward
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> Spy:
        def forward(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.calls.append((x[0, :, :2].clone(), y[0].clone(), ctx.clone()))
            return self.inner(x, t, ctx, y)

        self.fh.forward = forward
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.forward = self.inner

    def first_steps(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.calls[:: self.fh.settings.steps]


def test_a_chunk_engine_that_asks_for_whole_chunks(engine: FlashHeadEngine, prepared: object) -> None:
    assert engine.chunked and engine.name == "flashhead"
    assert engine.min_subclip_frames == engine.new_frames == N  # 33 frames, continuing from 5
    assert engine.size == (64, 64) and engine.fps == FPS
    assert rig_size(64, 64) == rig_size(512, 512) == (512, 512) and rig_size(480, 832) == (512, 896)
    idle = engine.idle_frame(prepared)
    assert idle.shape == (64, 64, 3) and idle.dtype == np.uint8
    assert engine.backends == {"dit": "eager", "vae_encoder": "eager", "vae_decoder": "eager"}


def test_the_plan_reaches_the_reference_and_motion_latents(engine: FlashHeadEngine, prepared: object) -> None:
    """A cheerful and a sad plan give the DiT different references (y) and motion latents."""
    plans = {"cheerful": [shot(EmotionLabel.happy)], "sad": [shot(EmotionLabel.sad)]}
    keys = {name: engine.keyframes(prepared, p, [0.0, CLIP]) for name, p in plans.items()}
    # what the rig rendered for each: a smile, and lowered corners with frowning brows
    faces = {}
    for name, (_, last) in keys.items():
        state = last.state
        assert isinstance(state, ChunkKeyframe) and last.image is not None
        big = engine.rig.render(prepared.portrait, engine.rig.full_controls(  # type: ignore[attr-defined]
            prepared.portrait, state.controls, np.zeros((1, 5), np.float32)))  # type: ignore[attr-defined]  # fmt: skip
        assert np.abs(engine._to_chunk_size(big).astype(int) - last.image).max() == 0
        faces[name] = analyse_face(big).landmarks
    neutral = analyse_face(prepared.portrait.image).landmarks  # type: ignore[attr-defined]
    assert mouth_corner_lift(faces["cheerful"]) > mouth_corner_lift(neutral) > mouth_corner_lift(faces["sad"])
    assert brow_height(faces["sad"]) < brow_height(neutral)
    # and the DiT gets them: y is the reference latent, the motion latent of a first chunk its first frame
    seen = {}
    for name, (first, last) in keys.items():
        with Spy(engine.model) as spy:
            engine.subclip(prepared, first, last, [silence(CLIP)], plans[name])
        motion, y, _ = spy.first_steps()[0]
        assert torch.equal(y, last.state.reference.latent)
        assert torch.equal(motion[:, :1], y[:, :1])  # a stream starts from its reference image
        seen[name] = (motion[:, :1], y)
    for a, b in zip(seen["cheerful"], seen["sad"], strict=True):
        assert (a - b).abs().mean() > 1e-3


def test_a_steady_plan_encodes_one_reference_and_gestures_reach_the_pose(
    engine: FlashHeadEngine, prepared: object
) -> None:
    still = [shot(head_motion=0.0)]
    keys = engine.keyframes(prepared, still, [k * CLIP for k in range(4)])
    refs = {id(k.state.reference) for k in keys}
    assert len(refs) == 1  # one encode: the chunks' anchor does not move, blinks and sway stay out
    tilt = [shot(gestures=[Gesture(kind=GestureKind.tilt, at=0.0, duration=2 * CLIP, strength=1.0)])]
    tilted = engine.keyframes(prepared, tilt, [CLIP])[0]
    assert tilted.state.controls[0, 2] != 0.0  # roll: a held tilt is part of the reference's pose
    assert tilted.image is not None and np.abs(tilted.image.astype(int) - keys[1].image).mean() > 0.5
    controls = reference_controls(still, 1.7, 7, 1)
    assert controls[0, :6].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0] and controls[0, 9] == 0.0  # no blink
    # a listener's gaze turns to the other face; alone, it stays on the camera
    listen = [
        shot(gaze=GazeTarget.speaker),
        shot(gaze=GazeTarget.speaker).model_copy(update={"character": 1}),
    ]
    pair = reference_controls(listen, 1.0, 7, 2, xs=[100.0, 400.0])
    assert pair[0, 11] > 0.3 and pair[1, 11] < -0.3  # gaze_x: towards each other
    assert reference_controls(listen[:1], 1.0, 7, 1)[0, 11] == 0.0


def test_frames_follow_the_audio_and_chunks_continue_one_another(
    engine: FlashHeadEngine, prepared: object
) -> None:
    plan = [default_shot(0, 60)]
    k = engine.keyframes(prepared, plan, [0.0, CLIP, 2 * CLIP])
    talk = voice(3 * CLIP)
    with Spy(engine.model) as spy:
        a = engine.subclip(prepared, k[0], k[1], [talk], plan)
        b = engine.subclip(prepared, k[1], k[2], [talk], plan)
    assert len(a) == len(b) == N + 1 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in a + b)
    assert np.array_equal(a[-1], b[0])  # the join: frame n of one sub-clip is frame 0 of the next
    carry = k[1].state.carry
    assert carry is not None and carry.pts == CLIP and np.array_equal(carry.last_frame, a[-1])
    assert carry.audio.shape == (8 * AUDIO_RATE,)  # the reference's 8 s audio history
    np.testing.assert_array_equal(carry.audio[-N * 640 :], talk.window(0.0, CLIP))
    # the second chunk's motion latents are its predecessor's last five frames, re-encoded
    (_, _, ctx_a), (motion_b, _, ctx_b) = spy.first_steps()
    np.testing.assert_allclose(motion_b, engine.model.vae.encode(carry.motion_frames), atol=1e-5)
    assert ctx_a.shape == ctx_b.shape == (1, 33, 5, 12, 768)
    # the same audio renders the same frames; other audio, other frames
    again = engine.subclip(prepared, k[0], k[1], [talk], plan)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    quiet = engine.subclip(prepared, k[0], k[1], [silence(CLIP)], plan)
    other = engine.subclip(prepared, k[0], k[1], [voice(CLIP, hz=330)], plan)
    for changed in (quiet, other):
        assert (
            np.mean([np.abs(x.astype(float) - y).mean() for x, y in zip(a[1:], changed[1:], strict=True)]) > 3
        )


def test_a_sub_clip_without_its_predecessor_starts_from_its_keyframe(
    engine: FlashHeadEngine, prepared: object, caplog: pytest.LogCaptureFixture
) -> None:
    plan = [default_shot(0, 60)]
    k = engine.keyframes(prepared, plan, [2 * CLIP, 3 * CLIP, 3 * CLIP + 1 / FPS])
    with caplog.at_level(logging.INFO, logger="engines.dit.flashhead.engine"):
        frames = engine.subclip(prepared, k[0], k[1], [voice(CLIP, start=2 * CLIP)], plan)
    assert len(frames) == N + 1 and "starts afresh from its keyframe" in caplog.text
    assert k[1].state.carry is not None
    # a sub-clip that is not whole chunks (the server's one-frame warm-up) renders, and carries nothing
    with caplog.at_level(logging.INFO, logger="engines.dit.flashhead.engine"):
        short = engine.subclip(prepared, k[1], k[2], [voice(CLIP, start=3 * CLIP)], plan)
    assert len(short) == 2 and k[2].state.carry is None and "not a whole number of chunks" in caplog.text


def test_bad_calls_are_named(engine: FlashHeadEngine, prepared: object) -> None:
    k = engine.keyframes(prepared, [default_shot(0, 9)], [0.0, CLIP])
    foreign = Keyframe(pts=CLIP, state=np.zeros(3), image=None)
    with pytest.raises(ValueError, match="not made by the flashhead engine"):
        engine.subclip(prepared, k[0], foreign, [silence(CLIP)], [default_shot(0, 9)])
    quiet = engine.subclip(prepared, k[0], k[1], [], [default_shot(0, 9)])  # no voice given: silence
    assert len(quiet) == N + 1
    with pytest.raises(ValueError, match="increase strictly"):
        engine.keyframes(prepared, [default_shot(0, 9)], [CLIP, 0.0])
    with pytest.raises(ValueError, match="no face found"):
        engine.prepare(Avatar("flat", np.full((80, 80, 3), 128, np.uint8)))


async def test_two_chunks_through_the_scheduler(engine: FlashHeadEngine, prepared: object) -> None:
    """Known (TTS) audio for two chunks: the scheduler asks for 28-frame sub-clips, they chain."""
    timeline = AudioTimeline(horizon_s=20)
    samples = voice(2 * CLIP).samples[int(0.3 * AUDIO_RATE) :]
    timeline.write_tts(0.0, samples, np.zeros(3 * len(samples), np.int16), [], now=0.0)
    playout = Playout(FPS, 3.0)
    clock = FakeClock()
    sched = CascadeScheduler(
        engine, prepared, timeline, clock, playout, InlineExecutor(),
        SchedulerConfig(subclip_frames=1, workers=1, delay_s=3.0),
    )  # fmt: skip
    assert sched.n == N  # the scheduler never asks for less than a chunk
    sched.inbox.post(WindowPlanned(default_window(), 0))
    task = asyncio.ensure_future(sched.run())
    try:
        for _ in range(40):  # keyframes for the second chunk are made one second ahead of it
            if sched.stats.clips_rendered == 2:
                break
            await clock.advance(0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sched.stats.clips_rendered == 2 and playout.buffered() == 2 * N
    assert sched.keyframes[1].state.carry is not None  # the second continued from the first
    idle = engine.idle_frame(prepared)
    frames = [playout.take(i, idle) for i in range(2 * N)]
    assert all(fresh for _, fresh in frames) and len({f.tobytes() for f, _ in frames}) == 2 * N


def default_window() -> object:
    from engines.storyline import Window

    return Window(start=0, end=10, shots=[default_shot(0, 10)])


def test_lite_asks_for_24_frame_chunks(tmp_path: pathlib.Path) -> None:
    weights = write_published_layout(tmp_path, model="lite", num_layers=1)
    wav2vec = tmp_path / "wav2vec2-base-960h"
    lite = build_flashhead_engine(
        weights, wav2vec=wav2vec, model="lite", device="cpu", dtype="fp32", size=(64, 64)
    )
    assert lite.min_subclip_frames == 24 and lite.model.motion_frames == 9
    assert lite.backends == {"dit": "eager", "vae_encoder": "eager", "vae_decoder": "eager"}
    prep = lite.prepare(Avatar("astronaut", astronaut()))
    k = lite.keyframes(prep, [default_shot(0, 9)], [0.0, 24 / FPS, 48 / FPS])
    a = lite.subclip(prep, k[0], k[1], [voice(2.0)], [default_shot(0, 9)])
    b = lite.subclip(prep, k[1], k[2], [voice(2.0)], [default_shot(0, 9)])
    assert len(a) == len(b) == 25 and np.array_equal(a[-1], b[0])


def test_what_cannot_start_says_what_is_missing_and_where_it_is_published(
    layout: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    weights, wav2vec = layout
    with pytest.raises(
        ValueError, match=r"needs --weights DIR.*Model_Pro/ and VAE_Wan/Wan2.1_VAE.pth.*huggingface"
    ):
        create_engine("flashhead", device="cpu")
    with pytest.raises(ValueError, match=r"needs --wav2vec DIR.*facebook/wav2vec2-base-960h"):
        create_engine("flashhead", weights=weights, device="cpu")
    with pytest.raises(ValueError, match=r"missing Model_Lite/config.json.*VAE_LTX/config.json"):
        create_engine("flashhead", weights=weights, wav2vec=wav2vec, model="lite", device="cpu")
    with pytest.raises(ValueError, match=r"does not exist"):
        create_engine("flashhead", weights=tmp_path / "nowhere", wav2vec=wav2vec, device="cpu")
    with pytest.raises(ValueError, match=r"size 60x64.*multiples of 16"):
        create_engine("flashhead", weights=weights, wav2vec=wav2vec, device="cpu", size="60x64")
    with pytest.raises(ValueError, match=r"'big' is not WIDTHxHEIGHT"):
        create_engine("flashhead", weights=weights, wav2vec=wav2vec, device="cpu", size="big")
    with pytest.raises(ValueError, match="either --weights DIR or --random-weights"):
        create_engine("flashhead", weights=weights, wav2vec=wav2vec, random_weights=True, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no CUDA GPU.*--device cpu"):
            create_engine("flashhead", weights=weights, wav2vec=wav2vec, device="cuda")


def test_random_weights_are_made_in_the_target_dtype() -> None:
    """``FlashHead.random`` (benchmarks) allocates each weight on the device in its dtype, once."""
    fh = FlashHead.random(
        device="cpu", dtype=torch.bfloat16, tiny=True, settings=ChunkSettings(height=64, width=64)
    )
    dtypes = {p.dtype for p in fh.transformer.parameters()} | {p.dtype for p in fh.vae.model.parameters()}  # type: ignore[attr-defined]
    assert dtypes == {torch.bfloat16}
    assert fh.transformer.text_embedding is None and fh.transformer.config.num_layers == 2
    assert {p.dtype for p in fh.audio.model.parameters()} == {
        torch.float32
    }  # wav2vec2 in float32, as the reference

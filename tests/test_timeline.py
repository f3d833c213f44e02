"""Audio timeline, ingest placement, voice activity and text checks."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import AUDIO_RATE, PhonemeEvent
from realtime.clock import FakeClock
from realtime.events import Inbox
from realtime.ingest import MicIngest
from realtime.timeline import AudioTimeline
from realtime.tts import MAX_SAY_CHARS, clean_text, synthesize
from realtime.vad import VoiceActivity
from tests.helpers import speech


def chunk(value: float, seconds: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    n = round(seconds * AUDIO_RATE)
    return np.full(n, value, np.float32), np.full(n * 3, int(value * 32767), np.int16)


def test_mic_chunks_are_placed_by_arrival_and_stay_contiguous() -> None:
    tl = AudioTimeline(horizon_s=10)
    ing = MicIngest(tl, FakeClock(), Inbox())
    starts = []
    for k, jitter in enumerate([0.0, 0.004, -0.003, 0.006, 0.0]):
        ana, out = chunk(0.1)
        starts.append(ing.push(ana, out, 0.9, arrived=0.5 + 0.02 * (k + 1) + jitter))
    assert np.allclose(np.diff(starts), 0.02)  # contiguous despite jitter
    # ahead of arrival after a burst: speech stays contiguous, silence re-syncs
    for k in range(3):
        ana, out = chunk(0.1)
        last = ing.push(ana, out, 0.9, arrived=0.61 + 0.001 * k)
    assert last == pytest.approx(starts[-1] + 0.06)
    ana, out = chunk(0.0)
    assert ing.push(ana, out, 0.0, arrived=0.64) == pytest.approx(0.62)
    # a stall longer than the resync limit restarts placement at the arrival time
    ana, out = chunk(0.1)
    late = ing.push(ana, out, 0.9, arrived=2.0)
    assert late == pytest.approx(1.98)
    assert tl.known(0.5, 0.6) and not tl.known(2.0, 2.1)
    assert np.allclose(tl.slice(0.7, 1.9).samples, 0.0)  # the gap reads as silence


def test_tts_owns_its_interval_and_interrupt_cuts_it() -> None:
    tl = AudioTimeline(horizon_s=10)
    n = AUDIO_RATE  # one second of TTS at 1.0
    ph = [PhonemeEvent("a", 1.0, 1.5), PhonemeEvent("m", 1.5, 1.9)]
    end = tl.write_tts(1.0, np.full(n, 0.5, np.float32), np.full(3 * n, 1000, np.int16), ph, now=0.9)
    assert end == pytest.approx(2.0)
    assert tl.known(1.0, 2.0) and tl.speaking_tts(1.5)
    ana, out = chunk(0.9, seconds=0.5)
    tl.write_mic(1.2, ana, out, 1.0, arrived=1.7)  # the mic does not talk over TTS
    assert np.allclose(tl.slice(1.2, 1.7).samples, 0.5)
    assert tl.cut_tts(1.6)
    assert np.allclose(tl.slice(1.6, 2.0).samples, 0.0)
    assert (tl.read_out(1.6, 4800) == 0).all() and (tl.read_out(1.5, 100) == 1000).all()
    assert [p.phoneme for p in tl.slice(1.0, 2.0).phonemes] == ["a", "m"]
    assert not tl.speaking_tts(1.7)


def test_timeline_refuses_audio_beyond_its_horizon() -> None:
    tl = AudioTimeline(horizon_s=5)
    n = AUDIO_RATE * 6
    with pytest.raises(ValueError, match="too far"):
        tl.write_tts(0.0, np.zeros(n, np.float32), np.zeros(3 * n, np.int16), [], now=0.0)


def test_voice_activity_tells_speech_from_noise_and_silence() -> None:
    voice = speech("Good evening everyone, thanks for joining.")
    probs = VoiceActivity().feed(voice)
    noise = np.random.default_rng(0).normal(0, 0.05, AUDIO_RATE).astype(np.float32)
    assert max(probs) > 0.9
    assert max(VoiceActivity().feed(noise)) < 0.3
    assert max(VoiceActivity().feed(np.zeros(AUDIO_RATE, np.float32))) < 0.1


def test_tts_chunks_carry_audio_and_phoneme_timings() -> None:
    chunks = list(synthesize("Hi. Bye now."))
    assert chunks and all(c.ana.dtype == np.float32 and c.out.dtype == np.int16 for c in chunks)
    for c in chunks:
        assert len(c.out) == pytest.approx(3 * len(c.ana), abs=3)
        assert c.phonemes[-1].end == pytest.approx(c.duration, abs=0.05)
        assert any(p.phoneme in ("b", "h") for p in c.phonemes) or len(c.phonemes) > 2


@pytest.mark.parametrize("bad,msg", [
    (None, "must be a string"), (42, "must be a string"), ("   \x00\x07 ", "empty"),
    ("x" * (MAX_SAY_CHARS + 1), "limit"),
])
def test_clean_text_rejects_bad_input(bad: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        clean_text(bad)


def test_clean_text_strips_control_characters() -> None:
    assert clean_text("hello\x00 \x1b[31mworld\n") == "hello [31mworld"


def test_long_say_text_is_cut_into_phrases() -> None:
    from realtime.tts import phrases

    text = ("This is a long sentence that the avatar says out loud, and it goes on for quite a "
            "while, so we can cut it. Short one!")
    parts = phrases(text)
    assert " ".join(parts) == text
    assert len(parts) == 3 and all(len(p) <= 80 for p in parts)


def test_microphone_frames_are_mixed_and_decimated_like_a_resampler() -> None:
    """WebRTC's 48 kHz stereo frames, 20 ms at a time, give the 16 kHz speech a resampler gives."""
    import av
    from scipy.signal import resample_poly

    voice = speech("The quick brown fox jumps over the lazy dog.", rate=48_000)
    stereo = np.stack([voice, 0.5 * voice], 1)
    pcm = np.round(stereo * 32767).astype(np.int16)
    ing = MicIngest(AudioTimeline(horizon_s=10), FakeClock(), Inbox())
    got16, got48 = [], []
    for k in range(len(pcm) // 960):
        frame = av.AudioFrame.from_ndarray(pcm[k * 960:(k + 1) * 960].reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = 48_000
        ana, out, _ = ing.decode(frame)
        got16.append(ana)
        got48.append(out)
    a16, a48 = np.concatenate(got16), np.concatenate(got48)
    mono = pcm.astype(np.float32).mean(axis=1)
    assert np.abs(a48 - mono[: len(a48)]).max() <= 1  # the way back: the mix, at 48 kHz
    ref = resample_poly(mono / 32768, 1, 3)[: len(a16)]
    delay = 10  # the 61-tap filter's group delay: 30 samples at 48 kHz
    err = a16[delay:] - ref[: len(a16) - delay]
    assert len(a16) == len(pcm) // 960 * 320
    assert np.sqrt(np.mean(err ** 2)) < 0.02 * np.sqrt(np.mean(ref ** 2))


def test_a_lap_of_the_ring_later_silence_reads_as_silence_not_old_speech() -> None:
    """Speech, then nothing for longer than the horizon: where nothing was written again, the
    timeline reads zeros (voice, engine audio, voice activity), not the speech of a lap before."""
    tl = AudioTimeline(horizon_s=10)
    ana, out = chunk(0.5, seconds=2.0)
    tl.write_tts(1.0, ana, out, [], now=0.0)
    assert np.all(tl.read_out(1.5, 4800) != 0)
    # 10 s later (one lap) the slots that held it are read for pts 11-13: nothing was said there
    assert np.all(tl.read_out(11.0, 48_000) == 0)
    later = tl.slice(11.0, 13.0)
    assert np.all(later.samples == 0) and np.all(later.vad == 0)
    # speech written past a stretch nobody wrote: the stretch in between is silent too
    tl.write_tts(16.0, ana, out, [], now=9.0)
    assert np.all(tl.read_out(14.0, 48_000 * 2) == 0)
    assert np.all(tl.read_out(16.0, 48_000) != 0)
    assert np.all(tl.slice(14.0, 15.9).samples == 0)

"""FlashHead's audio features: wav2vec2 layer outputs at the video rate, and the 5-frame windows.

The wav2vec2 folders are random models saved by transformers: a small one
(2 layers of width 32) and one with wav2vec2-base's 12 layers of width 768
and narrow everything else (see :func:`tests.flashhead_layout.write_wav2vec`).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from engines.dit.flashhead.audio import Wav2Vec2Features, audio_windows
from tests.flashhead_layout import tone, write_wav2vec


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Wav2Vec2Features:
    folder = tmp_path_factory.mktemp("wav2vec_small")
    write_wav2vec(folder, published_widths=False)
    return Wav2Vec2Features(folder)


def test_the_ctc_checkpoints_encoder_is_what_loads(tmp_path_factory: pytest.TempPathFactory) -> None:
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("wav2vec_ctc")
    write_wav2vec(folder, published_widths=False)
    saved = load_file(str(folder / "model.safetensors"))
    loaded = Wav2Vec2Features(folder).model.state_dict()
    encoder = {k.removeprefix("wav2vec2."): v for k, v in saved.items() if k.startswith("wav2vec2.")}
    assert set(encoder) <= set(loaded) and len(encoder) > 40
    for k, v in encoder.items():
        assert torch.equal(loaded[k], v), k


def test_layer_outputs_equal_transformers_own_hidden_states(small: Wav2Vec2Features) -> None:
    # at 50 fps and 320 k + 100 samples the convolutions give exactly int(len * 50 / 16000)
    # frames, the resampling is the identity, and the layer outputs must be transformers' own
    noise = np.random.default_rng(0).standard_normal(320 * 40 + 100).astype(np.float32)
    speech = tone(1.0)[: 320 * 40 + 100] + 0.05 * noise
    ours = small(speech, fps=50)
    assert ours.shape == (40, 2, 32)
    x = (speech - speech.mean()) / np.sqrt(speech.var() + 1e-7)
    with torch.no_grad():
        out = small.model(torch.from_numpy(x.astype(np.float32))[None], output_hidden_states=True)
    theirs = torch.stack(out.hidden_states[1:], dim=2)[0]  # (frames, layers, hidden)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_frames_follow_the_video_rate_and_the_signal_is_normalised_whole(small: Wav2Vec2Features) -> None:
    speech = tone(2.5, hz=180) * np.linspace(0.2, 1.0, 40000, dtype=np.float32)
    emb = small(speech)
    assert emb.shape == (62, 2, 32)  # int(40000 * 25 / 16000) = 62, truncated
    assert small(speech[:16001]).shape[0] == 25
    # the feature extractor normalises the whole array: a louder copy gives the same features
    assert torch.allclose(small(3.0 * speech + 0.5), emb, atol=1e-4)
    assert not torch.allclose(small(speech[::-1].copy()), emb, atol=1e-3)


def test_bad_audio_is_rejected_with_its_shape(small: Wav2Vec2Features) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 16000\)"):
        small(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(ValueError, match="make no video frame"):
        small(np.zeros(500, dtype=np.float32))
    with pytest.raises(ValueError, match="16000 Hz"):
        small(np.zeros(48000, dtype=np.float32), sample_rate=48000)


def test_published_widths_give_twelve_layers_of_768(tmp_path: pathlib.Path) -> None:
    write_wav2vec(tmp_path)
    emb = Wav2Vec2Features(tmp_path)(tone(1.32))
    assert emb.shape == (33, 12, 768) and emb.dtype == torch.float32


def test_windows_of_a_known_signal() -> None:
    # embedding i holds the number i in every entry: each window row names its source frame
    emb = torch.arange(10, dtype=torch.float32).view(10, 1, 1).expand(10, 12, 768)
    ctx = audio_windows(emb)
    assert ctx.shape == (1, 10, 5, 12, 768)
    rows = ctx[0, :, :, 0, 0].int().tolist()
    assert rows[0] == [0, 0, 0, 1, 2]
    assert rows[4] == [2, 3, 4, 5, 6]
    assert rows[9] == [7, 8, 9, 9, 9]
    # a stream's chunk [start, end): earlier frames are used, later ones clamp to end - 1
    part = audio_windows(emb, 5, 8)[0, :, :, 0, 0].int().tolist()
    assert part == [[3, 4, 5, 6, 7], [4, 5, 6, 7, 7], [5, 6, 7, 7, 7]]
    with pytest.raises(ValueError, match=r"\[8, 12\)"):
        audio_windows(emb, 8, 12)

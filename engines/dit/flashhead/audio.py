"""FlashHead's audio features: wav2vec2 layer outputs at the video frame rate, and their windows.

What the reference's ``preprocess_audio`` computes, from a local
``facebook/wav2vec2-base-960h`` folder: the feature extractor normalises the
whole signal (zero mean, unit variance); the convolutional features (50 per
second) are resampled linearly (``align_corners=True``) to
``int(len * fps / 16000)`` frames *before* the transformer; the output is the
stack of the 12 transformer layer outputs (``hidden_states[1:]``), one
``(12, 768)`` block per video frame. The reference's wav2vec2 subclass reads
the encoder's per-layer states, which transformers 5 no longer returns from
the encoder, so :class:`Wav2Vec2Features` runs the encoder's steps itself and
keeps each layer's output.

:func:`audio_windows` then gives each video frame the embeddings of frames
``i-2 .. i+2``, clamped to the ends, as the reference's ``get_audio_embedding``.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engines.dit.flashhead.transformer import AUDIO_WINDOW

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000


class Wav2Vec2Features:
    """wav2vec2 layer outputs per video frame, from a local transformers folder."""

    def __init__(self, folder: pathlib.Path, *, device: torch.device | str = "cpu") -> None:
        import transformers

        folder = pathlib.Path(folder)
        model = transformers.Wav2Vec2Model.from_pretrained(folder, local_files_only=True)
        extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        self._setup(model, extractor, device, str(folder))

    @classmethod
    def from_modules(
        cls, model: Any, extractor: Any, *, device: torch.device | str = "cpu"
    ) -> Wav2Vec2Features:
        """From a ``transformers.Wav2Vec2Model`` and its feature extractor (e.g. random, for benchmarks)."""
        self = cls.__new__(cls)
        self._setup(model, extractor, device, type(model).__name__)
        return self

    def _setup(self, model: Any, extractor: Any, device: torch.device | str, where: str) -> None:
        self.model = model
        torch.nn.Module.to(self.model, device=device, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        if self.model.config.do_stable_layer_norm:
            raise ValueError(
                f"{where}: a stable-layer-norm wav2vec2 (large) is not what FlashHead was trained on "
                "(facebook/wav2vec2-base-960h)"
            )
        self.extractor = extractor
        self.device = torch.device(device)
        self.layers = int(self.model.config.num_hidden_layers)
        self.hidden = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, speech: np.ndarray, *, fps: int = 25, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """``(frames, layers, hidden)`` float32 on the device, ``frames = int(len * fps / sample_rate)``."""
        speech = np.asarray(speech)
        if speech.ndim != 1:
            raise ValueError(f"speech has shape {speech.shape}; expected a 1-D array of samples")
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"sample_rate {sample_rate}: wav2vec2 takes {SAMPLE_RATE} Hz audio")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        frames = int(len(speech) * fps / sample_rate)
        if frames < 1:
            raise ValueError(f"{len(speech)} samples make no video frame at {fps} fps")
        values = np.squeeze(self.extractor(speech, sampling_rate=sample_rate).input_values)
        x = torch.from_numpy(np.asarray(values)).float().to(self.device).unsqueeze(0)
        m = self.model
        conv = m.feature_extractor(x).transpose(1, 2)  # (1, n, conv_dim) at 50 per second
        if conv.shape[1] < 1:
            raise ValueError(f"{len(speech)} samples are too short for wav2vec2's convolutions")
        conv = F.interpolate(conv.transpose(1, 2), size=frames, mode="linear", align_corners=True).transpose(
            1, 2
        )
        hidden, _ = m.feature_projection(conv)
        encoder = m.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        hidden = encoder.dropout(encoder.layer_norm(hidden))
        outputs = []
        for layer in encoder.layers:
            hidden = layer(hidden, attention_mask=None)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            outputs.append(hidden)
        return torch.stack(outputs, dim=2)[0]  # (frames, layers, hidden)


def audio_windows(embedding: torch.Tensor, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """``(1, end - start, 5, layers, hidden)``: for frame ``i`` the embeddings ``i-2 .. i+2``.

    Indices are clamped to ``[0, end - 1]``, as the reference clamps them:
    frames before ``start`` are used when they exist, frames at or past ``end``
    never are (the stream's newest frame repeats).
    """
    n = embedding.shape[0]
    start = 0 if start is None else start
    end = n if end is None else end
    if not 0 <= start < end <= n:
        raise ValueError(f"audio window range [{start}, {end}) is not inside the {n} embedded frames")
    half = AUDIO_WINDOW // 2
    offsets = torch.arange(AUDIO_WINDOW) - half
    index = (torch.arange(start, end).unsqueeze(1) + offsets.unsqueeze(0)).clamp(0, end - 1)
    return embedding[index.to(embedding.device)].unsqueeze(0).contiguous()

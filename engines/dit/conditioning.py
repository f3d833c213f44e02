"""Text and audio conditioning for the DiT engine.

Text: a local text-encoder folder (Wan's UMT5 or any T5-style encoder) via
transformers, or a file of precomputed embeddings. Audio: wav2vec2 hidden
states from a local folder via transformers, or the built-in log-mel encoder
(no weights) used by tests and random-weight runs. Both audio encoders give
50 feature frames per second; :func:`window_features` cuts one fixed-size
window per latent frame for the adapter's frame-local attention.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pathlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from engines.base import AUDIO_RATE

logger = logging.getLogger(__name__)

FEATURE_RATE = 50
"""Audio feature frames per second (wav2vec2's 320-sample stride at 16 kHz)."""


class TextEncoder(Protocol):
    dim: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(len(prompts), L, dim)`` float32 embeddings."""
        ...


class AudioEncoder(Protocol):
    dim: int

    def features(self, samples: np.ndarray) -> torch.Tensor:
        """``(T, dim)`` float32 features at :data:`FEATURE_RATE` of 16 kHz mono samples."""
        ...


def _stack_padded(items: list[torch.Tensor]) -> torch.Tensor:
    length = max(t.shape[0] for t in items)
    out = items[0].new_zeros(len(items), length, items[0].shape[1])
    for i, t in enumerate(items):
        out[i, : t.shape[0]] = t
    return out


class LocalTextEncoder:
    """A T5-style encoder and its tokenizer from local folders (Wan: UMT5-XXL).

    As in Wan's pipelines, embeddings past the prompt's own length are zero and
    every prompt is padded to ``max_length`` tokens.
    """

    def __init__(
        self,
        encoder_dir: pathlib.Path,
        tokenizer_dir: pathlib.Path | None = None,
        *,
        max_length: int = 512,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        import transformers

        tokenizer_dir = tokenizer_dir or encoder_dir
        if not (encoder_dir / "config.json").is_file():
            raise ValueError(f"text encoder folder {encoder_dir} has no config.json")
        config = transformers.AutoConfig.from_pretrained(encoder_dir, local_files_only=True)
        classes = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}
        cls = getattr(transformers, classes.get(config.model_type, "AutoModel"))
        self.model = cls.from_pretrained(encoder_dir, local_files_only=True, torch_dtype=dtype)
        self.model.to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.max_length = max_length
        self.device = device
        self.dim = int(config.d_model if hasattr(config, "d_model") else config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
        return hidden * mask.cpu().unsqueeze(-1).to(hidden.dtype)  # zeros past each prompt


class PrecomputedTextEmbeddings:
    """Embeddings stored in a safetensors file, one tensor ``(L, dim)`` per prompt.

    The key of each tensor is the prompt itself; the empty prompt ``""`` is the
    fallback for prompts that were not precomputed (logged once per prompt).
    """

    def __init__(self, path: pathlib.Path) -> None:
        from safetensors.torch import load_file

        if not path.is_file():
            raise ValueError(f"precomputed embeddings file {path} does not exist")
        self.table = {k: v.float() for k, v in load_file(str(path)).items()}
        if not self.table:
            raise ValueError(f"precomputed embeddings file {path} holds no tensors")
        dims = {v.shape[-1] for v in self.table.values()}
        if len(dims) != 1 or any(v.ndim != 2 for v in self.table.values()):
            raise ValueError(f"{path}: every embedding must be (tokens, dim) with one dim, got {dims}")
        self.dim = dims.pop()
        self._warned: set[str] = set()

    @staticmethod
    def save(path: pathlib.Path, table: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in table.items()}, str(path))

    def _lookup(self, prompt: str) -> torch.Tensor:
        hit = self.table.get(prompt)
        if hit is not None:
            return hit
        if "" not in self.table:
            raise ValueError(
                f"prompt {prompt[:60]!r} has no precomputed embedding and the file has no '' "
                "fallback; precompute it or give a text encoder folder"
            )
        if prompt not in self._warned:
            self._warned.add(prompt)
            logger.warning("no precomputed embedding for prompt %r; using the empty prompt", prompt[:60])
        return self.table[""]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return _stack_padded([self._lookup(p) for p in prompts])


class HashTextEncoder:
    """Deterministic pseudo-random embeddings per prompt: for random-weight runs only."""

    def __init__(self, dim: int, length: int = 16) -> None:
        self.dim = dim
        self.length = length

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(seed)
            out.append(torch.randn(self.length, self.dim, generator=gen))
        return torch.stack(out)


def _mel_filterbank(n_fft: int, n_mels: int, rate: int) -> torch.Tensor:
    """Triangular HTK-mel filters, ``(n_fft // 2 + 1, n_mels)``."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(up, down), 0.0, None).T.astype(np.float32))


class MelAudioEncoder:
    """Log-mel features at 50 Hz (25 ms windows): the built-in encoder, no weights."""

    def __init__(self, n_mels: int = 80) -> None:
        self.dim = n_mels
        self.n_fft = 400
        self.hop = AUDIO_RATE // FEATURE_RATE
        self._fb = _mel_filterbank(self.n_fft, n_mels, AUDIO_RATE)
        self._window = torch.hann_window(self.n_fft)

    def features(self, samples: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
        n = len(x) // self.hop
        if n == 0:
            return torch.zeros(0, self.dim)
        spec = (
            torch.stft(x, self.n_fft, self.hop, window=self._window, center=True, return_complex=True).abs()
            ** 2
        )  # (freq, n + 1)
        mel = torch.log(torch.clamp(spec.T @ self._fb, min=1e-10)) / 4.0
        return mel[:n]


class Wav2Vec2AudioEncoder:
    """wav2vec2 (or HuBERT-style) last hidden states from a local transformers folder."""

    def __init__(self, folder: pathlib.Path, *, device: str = "cpu") -> None:
        import transformers

        if not (folder / "config.json").is_file():
            raise ValueError(f"audio encoder folder {folder} has no config.json")
        self.model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        self.model.to(device).eval()
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def features(self, samples: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
        n = len(x) // (AUDIO_RATE // FEATURE_RATE)
        if n == 0:
            return torch.zeros(0, self.dim)
        x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)  # the feature extractor's normalisation
        hidden = self.model(x[None].to(self.device)).last_hidden_state[0].float().cpu()
        if hidden.shape[0] < n:  # conv stack drops a tail frame or two
            hidden = torch.cat([hidden, hidden[-1:].expand(n - hidden.shape[0], -1)])
        return hidden[:n]


def latent_frame_centres(t0: float, t1: float, video_frames: int, temporal_scale: int) -> np.ndarray:
    """Centre time of each latent frame of a causal video VAE.

    ``video_frames = 1 + temporal_scale * k`` frames span ``[t0, t1]`` evenly;
    latent frame 0 is video frame 0 and latent frame ``j`` covers video frames
    ``temporal_scale * (j - 1) + 1 .. temporal_scale * j``.
    """
    if (video_frames - 1) % temporal_scale:
        raise ValueError(f"{video_frames} video frames is not 1 + {temporal_scale} * k")
    times = np.linspace(t0, t1, video_frames)
    groups = [times[:1]] + [
        times[temporal_scale * (j - 1) + 1 : temporal_scale * j + 1]
        for j in range(1, (video_frames - 1) // temporal_scale + 1)
    ]
    return np.array([g.mean() for g in groups])


def window_features(feats: torch.Tensor, feats_t0: float, centres: np.ndarray, window: int) -> torch.Tensor:
    """``(F, window, dim)``: the ``window`` feature frames around each centre time.

    Feature ``k`` is at time ``feats_t0 + k / FEATURE_RATE``; frames outside the
    features are zero.
    """
    idx = np.rint((centres - feats_t0) * FEATURE_RATE).astype(np.int64)[:, None]
    idx = idx + np.arange(window)[None] - window // 2
    valid = (idx >= 0) & (idx < feats.shape[0])
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    gather = torch.from_numpy(np.where(valid, idx, feats.shape[0]))
    return padded[gather]


def audio_span(centres: np.ndarray, window: int) -> tuple[float, float]:
    """The audio interval whose features cover every window around ``centres``."""
    half = (window // 2 + 1) / FEATURE_RATE
    t0 = math.floor((float(centres[0]) - half) * FEATURE_RATE) / FEATURE_RATE
    return t0, float(centres[-1]) + half


class ClipImageEncoder:
    """CLIP vision features (penultimate hidden states) from local folders.

    Wan2.1 image-to-video and first-last-frame checkpoints (``image_dim`` set)
    cross-attend to these next to the text, as in diffusers' Wan I2V pipeline.
    """

    def __init__(
        self, encoder_dir: pathlib.Path, processor_dir: pathlib.Path | None = None, *, device: str
    ) -> None:
        import transformers

        if not (encoder_dir / "config.json").is_file():
            raise ValueError(f"image encoder folder {encoder_dir} has no config.json")
        self.model = transformers.CLIPVisionModel.from_pretrained(encoder_dir, local_files_only=True)
        torch.nn.Module.to(self.model, device).eval()
        self.processor = transformers.CLIPImageProcessor.from_pretrained(
            processor_dir or encoder_dir, local_files_only=True
        )
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(len(images), tokens, dim)`` for RGB uint8 images."""
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].float()

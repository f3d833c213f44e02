"""SoulX-FlashHead-1_3B: a Wan2.1 DiT with per-frame audio cross-attention, 4 distilled steps.

Loaded from the published folders as they are (see :mod:`.loading`); the
parts keep the reference's tensor conventions (see :mod:`.pipeline`). The
``flashhead`` engine (:mod:`.engine`) streams it through the cascade; its
networks' backends (TensorRT, ``torch.compile``) are chosen in :mod:`.backend`.
"""

from engines.dit.flashhead.audio import Wav2Vec2Features, audio_windows
from engines.dit.flashhead.color import color_correct
from engines.dit.flashhead.loading import (
    FLASHHEAD_REPO,
    WAV2VEC_REPO,
    FlashHeadFiles,
    LayoutError,
    load_transformer,
    published_files,
)
from engines.dit.flashhead.networks import FlashHeadNetworks, load_networks, random_networks
from engines.dit.flashhead.pipeline import Chunk, ChunkSettings, FlashHead, Reference, video_to_frames
from engines.dit.flashhead.sampler import denoise, renoise_step, sampling_timesteps
from engines.dit.flashhead.transformer import FlashHeadTransformer, transformer_flops

__all__ = [
    "FLASHHEAD_REPO",
    "WAV2VEC_REPO",
    "Chunk",
    "ChunkSettings",
    "FlashHead",
    "FlashHeadFiles",
    "FlashHeadNetworks",
    "FlashHeadTransformer",
    "LayoutError",
    "Reference",
    "Wav2Vec2Features",
    "audio_windows",
    "color_correct",
    "denoise",
    "load_networks",
    "load_transformer",
    "published_files",
    "random_networks",
    "renoise_step",
    "sampling_timesteps",
    "transformer_flops",
    "video_to_frames",
]

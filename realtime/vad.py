"""Voice activity with silero's ONNX model (shipped in the silero-vad wheel).

Runs on onnxruntime without torch, one thread, 512-sample blocks at 16 kHz.
One ``VoiceActivity`` per stream (it carries the model's recurrent state);
the inference session is shared by the process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import AUDIO_RATE
from engines.shared import SharedModel

BLOCK = 512
CONTEXT = 64


def _load_session() -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    # find the wheel's folder without importing the package (its __init__ imports torch)
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


MODEL = SharedModel("voice activity (silero, ONNX)", _load_session)


def load() -> None:
    """Load the model now (at server start), not in the first session."""
    MODEL.get()


class VoiceActivity:
    """Streaming speech probability; feed any number of 16 kHz samples at a time."""

    def __init__(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._sr = np.array(AUDIO_RATE, dtype=np.int64)
        self.last = 0.0

    def feed(self, samples: np.ndarray) -> list[float]:
        """Probabilities for each complete 512-sample block now available."""
        x = np.concatenate([self._pending, samples.astype(np.float32)])
        out: list[float] = []
        sess = MODEL.get()
        while len(x) >= BLOCK:
            block, x = x[:BLOCK], x[BLOCK:]
            inp = np.concatenate([self._context, block])[None, :]
            prob, self._state = sess.run(None, {"input": inp, "state": self._state,
                                                "sr": self._sr})
            self._context = block[-CONTEXT:]
            out.append(float(prob.reshape(-1)[0]))
        self._pending = x
        if out:
            self.last = out[-1]
        return out

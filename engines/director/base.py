"""The director protocol the live loop calls, one rolling window at a time."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from engines.storyline import Shot, Window, default_shot


@dataclass(slots=True)
class CharacterSpeech:
    """What one character says in a window (see ``PlanRequest`` for the fields)."""

    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text: str | None = None
    utterances: list[tuple[float, float, str]] = field(default_factory=list)
    recent_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    recent_start: float = 0.0


@dataclass(slots=True)
class PlanRequest:
    """What the director knows when it plans the window ``[start, end)``.

    ``audio`` is 16 kHz mono float32 for the window as far as it has arrived
    (the whole window for Say text and uploads, maybe nothing for live
    microphone audio planned ahead). ``text`` is the Say text that the window
    speaks, when the speech came from text; ``utterances`` are the Say texts
    overlapping the window with the pts span each is spoken in. When the
    window's own audio has not arrived, ``recent_audio`` is the latest audio
    that has (starting at ``recent_start``). ``instructions`` are the host's
    standing instructions, oldest first. ``history`` is the storyline so far.

    Those speech fields are ``character``'s (0 unless the request came from
    ``of``). An avatar with two faces has ``characters`` = 2, and ``cast``
    holds every character's speech (character 0 is the leftmost face); a
    director that knows nothing of characters plans character 0 from the
    fields above.
    """

    session_id: str
    start: float
    end: float
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text: str | None = None
    utterances: list[tuple[float, float, str]] = field(default_factory=list)  # Say text spans
    recent_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    recent_start: float = 0.0  # pts of recent_audio[0]
    instructions: list[str] = field(default_factory=list)
    history: list[Window] = field(default_factory=list)
    avatar_image: np.ndarray | None = None  # RGB uint8 reference portrait
    avatar_id: str = ""
    character: int = 0  # whose speech the fields above are
    characters: int = 1
    cast: list[CharacterSpeech] = field(default_factory=list)  # every character's, when > 1

    def speech_of(self, character: int) -> CharacterSpeech:
        """What ``character`` says in this window (silence if nothing is known)."""
        if character < len(self.cast):
            return self.cast[character]
        if character == self.character:
            return CharacterSpeech(self.audio, self.text, self.utterances, self.recent_audio,
                                   self.recent_start)
        return CharacterSpeech()

    def of(self, character: int) -> PlanRequest:
        """This request with ``character``'s speech in the single-character fields."""
        sp = self.speech_of(character)
        return dataclasses.replace(self, audio=sp.audio, text=sp.text, utterances=sp.utterances,
                                   recent_audio=sp.recent_audio, recent_start=sp.recent_start,
                                   character=character)


class Director(abc.ABC):
    """Plans one window of shots. Implementations must not block the event loop."""

    name = "director"

    @abc.abstractmethod
    async def plan_window(self, request: PlanRequest) -> Window:
        """Return the plan for ``[request.start, request.end)``."""

    @property
    def fallbacks(self) -> int:
        """Windows this director handed to a fallback (the LLM director's timeouts)."""
        return 0

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP sessions, model handles)."""

    async def warm_up(self, avatar_image: np.ndarray | None, avatar_id: str = "") -> None:
        """Load what the first window needs, before the first session (optional)."""
        await self.plan_window(PlanRequest(session_id="warm-up", start=0.0, end=2.0,
                                           text="Hello there.", utterances=[(0.0, 1.0, "Hello there.")],
                                           instructions=["be cheerful"], avatar_image=avatar_image,
                                           avatar_id=avatar_id))


class StaticDirector(Director):
    """A director that always plans one neutral shot per window."""

    name = "static"

    def __init__(self, shot: Shot | None = None) -> None:
        self._shot = shot

    async def plan_window(self, request: PlanRequest) -> Window:
        if self._shot is None:
            shot = default_shot(request.start, request.end)
        else:
            shot = self._shot.model_copy(update={"start": request.start, "end": request.end})
        shots = [shot.model_copy(update={"character": c}) for c in range(request.characters)]
        return Window(start=request.start, end=request.end, shots=shots)

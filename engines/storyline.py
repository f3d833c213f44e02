"""The storyline: the director's plan that every engine reads.

A storyline is a sequence of rolling windows; a window holds shots; a shot
says how the avatar should look and move between two pts (seconds on the
session clock). Engines read shots; the director writes them.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EmotionLabel(str, Enum):
    neutral = "neutral"
    happy = "happy"
    sad = "sad"
    angry = "angry"
    surprised = "surprised"
    fearful = "fearful"
    disgusted = "disgusted"
    thoughtful = "thoughtful"


class Emotion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: EmotionLabel = EmotionLabel.neutral
    intensity: float = Field(0.0, ge=0.0, le=1.0)


class Expression(BaseModel):
    """Expression controls on top of the emotion's own face (see ``shot_face``).

    ``smile``, ``brow_raise`` and ``brow_frown`` are offsets added to what the
    emotion implies; ``eye_openness`` scales the eyes (1 is the photo's own).
    """

    model_config = ConfigDict(extra="forbid")
    smile: float = Field(0.0, ge=-2.0, le=2.0, description="mouth corners: - down, + up")
    brow_raise: float = Field(0.0, ge=-1.0, le=1.0)
    brow_frown: float = Field(0.0, ge=-1.0, le=1.0)
    eye_openness: float = Field(1.0, ge=0.3, le=1.3, description="1 is the photo's own")


class GestureKind(str, Enum):
    nod = "nod"
    shake = "shake"
    tilt = "tilt"
    lean = "lean"


class Gesture(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: GestureKind
    at: float = Field(description="start pts, seconds on the session clock")
    duration: float = Field(0.8, gt=0.0, le=5.0)
    strength: float = Field(1.0, ge=0.0, le=1.0)


class GazeTarget(str, Enum):
    camera = "camera"
    away = "away"
    down = "down"
    speaker = "speaker"  # towards the other character (a listener); the camera if there is none


class Framing(str, Enum):
    close_up = "close_up"
    medium = "medium"
    wide = "wide"


class Shot(BaseModel):
    """One planned shot between ``start`` and ``end`` (session-clock seconds)."""

    model_config = ConfigDict(extra="forbid")
    start: float = Field(ge=0.0)
    end: float = Field(ge=0.0)
    character: int = Field(0, ge=0, le=1, description="whose shot: 0 or 1 in a two-person photo")
    emotion: Emotion = Field(default_factory=Emotion)
    expression: Expression = Field(default_factory=Expression)
    gestures: list[Gesture] = Field(default_factory=list)
    gaze: GazeTarget = GazeTarget.camera
    head_motion: float = Field(0.5, ge=0.0, le=1.0, description="head-motion energy")
    ease_s: float = Field(0.5, ge=0.0, le=2.0,
                          description="seconds the face takes to change from the shot before into this one")
    framing: Framing = Framing.close_up
    prompt: str = Field("", max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    rationale: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _ordered(self) -> Shot:
        if self.end < self.start:
            raise ValueError(f"shot end {self.end} is before its start {self.start}")
        return self

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: float = Field(ge=0.0)
    end: float = Field(ge=0.0)
    shots: list[Shot] = Field(default_factory=list)


class Storyline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    windows: list[Window] = Field(default_factory=list)

    def shot_at(self, t: float, character: int = 0) -> Shot | None:
        for window in reversed(self.windows):
            for shot in window.shots:
                if shot.character == character and shot.covers(t):
                    return shot
        return None

    def shots_between(self, t0: float, t1: float) -> list[Shot]:
        """Shots overlapping ``[t0, t1]`` (every character's), in time order."""
        out = [s for w in self.windows for s in w.shots if s.start < t1 and s.end > t0]
        out.sort(key=lambda s: s.start)
        return out

    def put(self, window: Window, *, forget_before: float = 0.0) -> Storyline:
        """A new storyline where ``window`` replaces what was planned from its start on.

        Windows that end before ``forget_before`` are dropped (the storyline stays bounded).
        """
        kept: list[Window] = []
        for w in self.windows:
            if w.start >= window.start:
                continue
            if w.end > window.start:
                shots = [s.model_copy(update={"end": min(s.end, window.start)})
                         for s in w.shots if s.start < window.start]
                w = Window(start=w.start, end=window.start, shots=shots)
            if w.end > forget_before:
                kept.append(w)
        kept.append(window)
        return Storyline(windows=kept)


EMOTION_FACE: dict[EmotionLabel, tuple[float, float, float, float]] = {
    EmotionLabel.neutral: (0.0, 0.0, 0.0, 0.0),
    EmotionLabel.happy: (0.7, 0.25, 0.0, 0.05),
    EmotionLabel.sad: (-0.45, 0.0, 0.55, -0.15),
    EmotionLabel.angry: (-0.3, 0.0, 0.9, 0.05),
    EmotionLabel.surprised: (0.1, 0.9, 0.0, 0.25),
    EmotionLabel.fearful: (-0.2, 0.6, 0.4, 0.2),
    EmotionLabel.disgusted: (-0.4, 0.0, 0.6, -0.15),
    EmotionLabel.thoughtful: (0.0, 0.15, 0.3, -0.1),
}
"""(smile, brow_raise, brow_frown, eye_wide) of each emotion at full intensity."""


def shot_face(shot: Shot) -> tuple[float, float, float, float]:
    """The face a shot asks for: (smile -1..1, brow_raise 0..1, brow_frown 0..1, eye_wide -0.7..0.3).

    The emotion's face scaled by its intensity, plus the expression offsets.
    """
    e = EMOTION_FACE[shot.emotion.label]
    k = shot.emotion.intensity
    ex = shot.expression
    smile = min(max(ex.smile + k * e[0], -1.0), 1.0)
    raise_ = min(max(ex.brow_raise + k * e[1], 0.0), 1.0)
    frown = min(max(ex.brow_frown + k * e[2], 0.0), 1.0)
    wide = min(max(ex.eye_openness - 1.0 + k * e[3], -0.7), 0.3)
    return smile, raise_, frown, wide


def default_shot(start: float, end: float) -> Shot:
    """The plan used where the director has not planned (neutral, gentle motion)."""
    return Shot(start=start, end=end, rationale="default: no plan for this time")

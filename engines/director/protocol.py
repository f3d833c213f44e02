"""The co-reasoning protocol: expert proposals, constraints, and how conflicts resolve.

Each expert posts a ``Proposal`` per round; the board of the previous round
is what every expert reads before it revises. After a bounded number of
rounds (or once nobody changes their mind) the proposals are merged field
by field by stated priorities:

1. ``CONSTRAINT``: what must not happen (the negative director, the host's
   prohibitions, what the portrait allows) beats everything;
2. ``INSTRUCTION``: what the host explicitly asked for beats what is inferred;
3. ``INFERRED``: what the audio, the words and the photo suggest.

Within one priority the more confident proposal wins. Both backends (the
embedded analysers and the LLM) use this same protocol and merge.
"""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field

from engines.storyline import (
    EmotionLabel,
    Framing,
    GazeTarget,
    Gesture,
    GestureKind,
    Shot,
    shot_face,
)


class Priority(IntEnum):
    INFERRED = 1
    INSTRUCTION = 2
    CONSTRAINT = 3


class Proposal(BaseModel):
    """One expert's proposal for one shot (fields left None have no opinion)."""

    model_config = ConfigDict(extra="forbid")
    expert: str
    priority: Priority = Priority.INFERRED
    confidence: float = Field(0.5, ge=0.0, le=1.0)
    emotion: EmotionLabel | None = None
    intensity: float | None = Field(None, ge=0.0, le=1.0)
    smile: float | None = Field(None, ge=-1.0, le=1.0)
    brow_raise: float | None = Field(None, ge=-1.0, le=1.0)
    brow_frown: float | None = Field(None, ge=-1.0, le=1.0)
    eye_openness: float | None = Field(None, ge=0.3, le=1.3)
    gestures: list[Gesture] = Field(default_factory=list)
    gaze: GazeTarget | None = None
    head_motion: float | None = Field(None, ge=0.0, le=1.0)
    framing: Framing | None = None
    prompt_terms: list[str] = Field(default_factory=list)
    rationale: str = Field("", max_length=300)

    def opinion(self) -> dict[str, object]:
        """The fields this proposal sets (for comparing rounds)."""
        return self.model_dump(exclude={"expert", "priority", "confidence", "rationale"},
                               exclude_none=True, mode="json")


class Limits(BaseModel):
    """Hard constraints on a shot (``CONSTRAINT`` priority), with negative prompt terms."""

    model_config = ConfigDict(extra="forbid")
    head_motion_max: float = 1.0
    smile_max: float = 1.0  # on the shot's face (see ``shot_face``)
    smile_min: float = -1.0
    brow_raise_max: float = 1.0
    brow_frown_max: float = 1.0
    gesture_strength_max: float = 1.0
    forbid_emotions: set[EmotionLabel] = Field(default_factory=set)
    forbid_gestures: set[GestureKind] = Field(default_factory=set)
    negatives: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)

    def tighten(self, other: Limits) -> Limits:
        return Limits(
            head_motion_max=min(self.head_motion_max, other.head_motion_max),
            smile_max=min(self.smile_max, other.smile_max),
            smile_min=max(self.smile_min, other.smile_min),
            brow_raise_max=min(self.brow_raise_max, other.brow_raise_max),
            brow_frown_max=min(self.brow_frown_max, other.brow_frown_max),
            gesture_strength_max=min(self.gesture_strength_max, other.gesture_strength_max),
            forbid_emotions=self.forbid_emotions | other.forbid_emotions,
            forbid_gestures=self.forbid_gestures | other.forbid_gestures,
            negatives=list(dict.fromkeys(self.negatives + other.negatives)),
            reasons=list(dict.fromkeys(self.reasons + other.reasons)),
        )


class Round(BaseModel):
    index: int
    proposals: list[Proposal]


OFFSET_BOUND = {"smile": 2.0, "brow_raise": 1.0, "brow_frown": 1.0}  # Expression's field bounds

SCALAR_FIELDS = ("emotion", "intensity", "smile", "brow_raise", "brow_frown", "eye_openness",
                 "gaze", "head_motion", "framing")


def _winner(proposals: list[Proposal], name: str) -> Proposal | None:
    having = [p for p in proposals if getattr(p, name) is not None]
    if not having:
        return None
    return max(having, key=lambda p: (int(p.priority), p.confidence))


def merge(proposals: list[Proposal], start: float, end: float) -> tuple[Shot, list[str]]:
    """One shot from the last round's proposals; returns it and the conflicts resolved."""
    values: dict[str, object] = {}
    conflicts: list[str] = []
    for name in SCALAR_FIELDS:
        win = _winner(proposals, name)
        if win is None:
            continue
        values[name] = getattr(win, name)
        losers = [p for p in proposals if getattr(p, name) is not None and p is not win
                  and getattr(p, name) != getattr(win, name)]
        if name == "emotion" and losers:
            lose = max(losers, key=lambda p: (int(p.priority), p.confidence))
            conflicts.append(f"emotion: {win.expert}'s {win.emotion.value if win.emotion else '-'} "
                             f"({win.priority.name.lower()}) over {lose.expert}'s "
                             f"{lose.emotion.value if lose.emotion else '-'}")
    # gestures: every proposal's, one per kind and time, the higher priority kept
    gestures: list[Gesture] = []
    for p in sorted(proposals, key=lambda p: -int(p.priority)):
        for g in p.gestures:
            if not start <= g.at < end:
                continue
            if any(abs(o.at - g.at) < 0.6 for o in gestures):
                continue  # one gesture at a time: the higher priority one stays
            gestures.append(g)
    label = values.pop("emotion", EmotionLabel.neutral)
    intensity = values.pop("intensity", 0.5)
    face = {k: values.pop(k) for k in ("smile", "brow_raise", "brow_frown", "eye_openness") if k in values}
    shot = Shot.model_validate({
        "start": start, "end": end,
        "emotion": {"label": label, "intensity": 0.0 if label == EmotionLabel.neutral else intensity},
        "expression": face, "gestures": sorted(gestures, key=lambda g: g.at),
        **values,  # gaze, head_motion, framing; the schema's defaults where nobody spoke
    })
    return shot, conflicts


def apply_limits(shot: Shot, limits: Limits) -> tuple[Shot, list[str]]:
    """Clamp a shot to hard constraints; returns it and what had to change."""
    changed: list[str] = []
    upd: dict[str, object] = {}
    emotion = shot.emotion
    if emotion.label in limits.forbid_emotions:
        changed.append(f"{emotion.label.value} is not allowed: neutral")
        emotion = emotion.model_copy(update={"label": EmotionLabel.neutral, "intensity": 0.0})
        upd["emotion"] = emotion
    if shot.head_motion > limits.head_motion_max:
        changed.append(f"head motion {shot.head_motion:.2f} capped at {limits.head_motion_max:.2f}")
        upd["head_motion"] = limits.head_motion_max
    gestures = [g for g in shot.gestures if g.kind not in limits.forbid_gestures]
    if limits.head_motion_max <= 0.05:
        gestures = []
    gestures = [g.model_copy(update={"strength": min(g.strength, limits.gesture_strength_max)})
                for g in gestures]
    if len(gestures) != len(shot.gestures):
        changed.append(f"{len(shot.gestures) - len(gestures)} gesture(s) removed")
    upd["gestures"] = gestures
    tmp = shot.model_copy(update=upd)
    smile, raise_, frown, _ = shot_face(tmp)
    ex = tmp.expression
    ex_upd: dict[str, float] = {}
    if smile > limits.smile_max + 1e-6:
        ex_upd["smile"] = ex.smile - (smile - limits.smile_max)
        changed.append(f"smile {smile:.2f} capped at {limits.smile_max:.2f}")
    elif smile < limits.smile_min - 1e-6:
        ex_upd["smile"] = ex.smile + (limits.smile_min - smile)
        changed.append(f"mouth corners {smile:.2f} raised to {limits.smile_min:.2f}")
    if raise_ > limits.brow_raise_max + 1e-6:
        ex_upd["brow_raise"] = ex.brow_raise - (raise_ - limits.brow_raise_max)
        changed.append("brow raise capped")
    if frown > limits.brow_frown_max + 1e-6:
        ex_upd["brow_frown"] = ex.brow_frown - (frown - limits.brow_frown_max)
        changed.append("frown capped")
    if ex_upd:
        ex_upd = {k: min(max(v, -OFFSET_BOUND[k]), OFFSET_BOUND[k]) for k, v in ex_upd.items()}
        upd["expression"] = ex.model_copy(update=ex_upd)
    negative = ", ".join(limits.negatives)
    upd["negative_prompt"] = negative[:2000]
    return shot.model_copy(update=upd), changed

"""The modality experts and the negative director (embedded: analysers, no LLM).

* ``AudioExpert``: what is said and how (transcript, emotion of the words,
  prosody: pitch, loudness, rate, pauses, emphasis; dialogue acts).
* ``VisualExpert``: what the portrait allows (face box and size, head pose,
  number of faces, framing, lighting), from the face mesh of the photo.
* ``TextExpert``: the host's standing instructions and the storyline so far.
* ``NegativeDirector``: per shot, what must not happen.

Each expert reads the shared ``Evidence`` and the previous round's board,
and posts a ``Proposal``; see ``engines.director.protocol``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from engines.director.instructions import Directives
from engines.director.language import ENGLISH_COMMON, Reading
from engines.director.models import sentence_encoder
from engines.director.prosody import Prosody
from engines.director.protocol import Limits, Priority, Proposal
from engines.storyline import EmotionLabel, Framing, GazeTarget, Gesture, GestureKind, Window

E = EmotionLabel


@dataclass(slots=True)
class VisualFacts:
    """What the reference portrait is like."""

    width: int
    height: int
    faces: int
    face_box: tuple[int, int, int, int]  # x, y, w, h
    face_frac: float  # face height over image height
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    brightness: float  # mean luma of the face, 0..1
    contrast: float
    side_light: float  # luma right half minus left half of the face, -1..1
    mouth_open: bool

    @property
    def framing(self) -> Framing:
        if self.face_frac >= 0.4:
            return Framing.close_up
        if self.face_frac >= 0.18:
            return Framing.medium
        return Framing.wide

    @property
    def lighting(self) -> str:
        if self.brightness < 0.3:
            return "dim"
        if self.brightness > 0.75:
            return "bright"
        if abs(self.side_light) > 0.12:
            return "side-lit"
        return "even"

    def summary(self) -> dict[str, object]:
        return {"faces": self.faces, "face_box": list(self.face_box), "face_frac": round(self.face_frac, 2),
                "yaw": round(self.yaw_deg), "pitch": round(self.pitch_deg), "roll": round(self.roll_deg),
                "framing": self.framing.value, "lighting": self.lighting}


def analyse_portrait(image: np.ndarray) -> VisualFacts:
    """Face mesh of the photo and what follows from it (raises NoFaceError)."""
    from engines.face import analyse_face

    a = analyse_face(image)
    lm = a.landmarks
    h, w = image.shape[:2]
    # roll: the line through the outer eye corners
    dx, dy = lm[263, :2] - lm[33, :2]
    roll = math.degrees(math.atan2(dy, dx))
    # yaw: where the nose tip sits between the face's sides
    left, right = lm[234, 0], lm[454, 0]
    r = (lm[1, 0] - left) / max(right - left, 1e-6)
    yaw = math.degrees(math.asin(float(np.clip(2 * r - 1, -1, 1))))
    # pitch: nose tip between the eye line and the mouth
    eye_y = (lm[33, 1] + lm[263, 1]) / 2
    mouth_y = (lm[13, 1] + lm[14, 1]) / 2
    q = (lm[1, 1] - eye_y) / max(mouth_y - eye_y, 1e-6)
    pitch = float(np.clip((q - 0.62) * 120, -60, 60))
    b = a.box
    x0, y0 = max(b.x, 0), max(b.y, 0)
    face = image[y0: y0 + max(b.h, 1), x0: x0 + max(b.w, 1)].astype(np.float32) / 255.0
    luma = face @ np.array([0.299, 0.587, 0.114], np.float32) if face.size else np.zeros((1, 1))
    half = luma.shape[1] // 2
    side = float(luma[:, half:].mean() - luma[:, :half].mean()) if half > 0 else 0.0
    face_h = float(np.linalg.norm(lm[10, :2] - lm[152, :2]))
    gap = float(np.linalg.norm(lm[13, :2] - lm[14, :2]))
    return VisualFacts(
        width=w, height=h, faces=a.num_faces, face_box=(b.x, b.y, b.w, b.h),
        face_frac=b.h / max(h, 1), yaw_deg=yaw, pitch_deg=pitch, roll_deg=roll,
        brightness=float(luma.mean()), contrast=float(luma.std()), side_light=side,
        mouth_open=gap > 0.03 * face_h,
    )


@dataclass(slots=True)
class Evidence:
    """What the experts share about one shot: the board they all read."""

    start: float
    end: float
    speaking: bool
    transcript: str = ""
    transcript_source: str = "none"  # say, whisper, none
    reading: Reading | None = None
    prosody: Prosody | None = None
    prosody_offset: float = 0.0  # pts of the prosody's first sample
    words_start: float = 0.0  # pts span the transcript's words are spread over
    words_end: float = 0.0
    visual: VisualFacts | None = None
    directives: Directives = field(default_factory=Directives)
    history: list[Window] = field(default_factory=list)
    character: int = 0  # whose shot this is
    listening_to: int | None = None  # silent while this character speaks (two-person avatars)

    def at(self, frac: float) -> float:
        """The pts of a position (0..1) in the transcript."""
        return self.words_start + frac * (self.words_end - self.words_start)


def _in_shot(ev: Evidence, t: float, dur: float = 0.8) -> float | None:
    """A gesture start inside the shot (moved in so that it ends inside), or None.

    Times well before the shot (words already said, heard while planning ahead of
    live audio) give no gesture.
    """
    if t < ev.start - 0.3 or t >= ev.end:
        return None
    t = min(max(t, ev.start), ev.end - min(dur, ev.end - ev.start) * 0.5)
    return t if ev.start <= t < ev.end else None


class AudioExpert:
    name = "audio"

    def propose(self, ev: Evidence, board: list[Proposal]) -> Proposal:
        if not ev.speaking and ev.listening_to is not None:
            return Proposal(expert=self.name, confidence=0.6, emotion=E.neutral, intensity=0.0,
                            head_motion=0.2, gaze=GazeTarget.speaker,
                            rationale=f"listening to character {ev.listening_to}: eyes on them, "
                                      "small motion, mouth closed")
        if not ev.speaking:
            return Proposal(expert=self.name, confidence=0.6, emotion=E.neutral, intensity=0.0,
                            head_motion=0.3, gaze=GazeTarget.camera,
                            rationale="silence: listening, mouth closed")
        r = ev.reading
        pros = ev.prosody
        arousal = pros.arousal if pros is not None else 0.4
        emotion, k, conf = E.neutral, 0.0, 0.4
        notes: list[str] = []
        if r is not None and r.text:
            emotion, k = r.emotion, r.intensity
            conf = 0.75 if r.english else 0.45
            notes.append(f"words read {emotion.value}" + (" (sarcasm)" if r.sarcasm else ""))
            if emotion != E.neutral:
                k = float(np.clip(k * (0.8 + 0.4 * arousal), 0.2, 1.0))
        elif pros is not None and pros.has_speech:
            # no words, only the voice: arousal alone
            if arousal > 0.7:
                emotion, k, conf = E.surprised, 0.4, 0.3
            notes.append(f"voice arousal {arousal:.2f}")
        # what the others posted last round: the host's emotion, a still head
        host_emotion = any(p.expert == "text" and p.emotion is not None and p.emotion != emotion
                           for p in board)
        still = any(p.expert == "text" and p.head_motion is not None and p.head_motion <= 0.05
                    for p in board)
        gestures: list[Gesture] = []
        if r is not None and not still:
            for at in r.act_times("agree")[:2]:
                t = _in_shot(ev, ev.at(at))
                if t is not None:
                    gestures.append(Gesture(kind=GestureKind.nod, at=t, duration=0.8, strength=0.5))
            for at in r.act_times("disagree")[:2]:
                t = _in_shot(ev, ev.at(at))
                if t is not None:
                    gestures.append(Gesture(kind=GestureKind.shake, at=t, duration=0.9, strength=0.5))
            for at in r.act_times("question")[:1]:
                t = _in_shot(ev, ev.at(at) - 0.5)
                if t is not None:
                    gestures.append(Gesture(kind=GestureKind.tilt, at=t, duration=1.0, strength=0.5))
        if pros is not None and not still and not gestures:
            for e in pros.emphasis[:1]:
                t = _in_shot(ev, ev.prosody_offset + e - 0.1, 0.6)
                if t is not None:
                    gestures.append(Gesture(kind=GestureKind.nod, at=t, duration=0.6, strength=0.35))
        # the host tied these gestures to their own triggers: no others of that kind
        tied = {k for k, trig in ev.directives.gestures.items() if trig != "always"}
        gestures = [g for g in gestures if g.kind not in tied]
        if host_emotion and emotion != E.neutral:
            # round 2+: the host asked for an emotion; the words defer, and only say how strongly
            conf = min(conf, 0.4)
            notes.append("host set the emotion")
        head = float(np.clip(0.3 + 0.5 * arousal, 0.0, 1.0))
        return Proposal(expert=self.name, confidence=conf, emotion=emotion, intensity=round(k, 3),
                        gestures=gestures, gaze=GazeTarget.camera, head_motion=round(head, 3),
                        rationale="; ".join(notes) or "speech")


class VisualExpert:
    name = "visual"

    def propose(self, ev: Evidence, board: list[Proposal]) -> Proposal:
        v = ev.visual
        if v is None:
            return Proposal(expert=self.name, confidence=0.1, rationale="no portrait analysis")
        terms = [f"{v.framing.value.replace('_', ' ')} portrait", f"{v.lighting} lighting"]
        notes = [f"{v.framing.value}, {v.lighting} light, yaw {v.yaw_deg:.0f} deg"]
        if v.faces > 1:
            notes.append(f"{v.faces} faces in the photo: each character is planned on its own")
        return Proposal(expert=self.name, confidence=0.6, framing=v.framing, prompt_terms=terms,
                        rationale="; ".join(notes))

    def limits(self, ev: Evidence) -> Limits:
        """What the portrait allows: a turned or tilted head must not turn much more."""
        v = ev.visual
        lim = Limits()
        if v is None:
            return lim
        if abs(v.yaw_deg) > 22 or abs(v.roll_deg) > 20:
            lim = Limits(head_motion_max=0.55, gesture_strength_max=0.6,
                         reasons=[f"head already turned ({v.yaw_deg:.0f} deg yaw, {v.roll_deg:.0f} deg "
                                  "roll): large motion would show what the photo hides"],
                         negatives=["revealing the hidden side of the face"])
        if v.face_frac < 0.12:
            lim = lim.tighten(Limits(gesture_strength_max=0.7,
                                     reasons=["small face: gestures kept small"]))
        return lim


TOPIC_STOP = {"about", "talk", "talking", "with", "from", "this", "that", "these", "those", "there",
              "here", "what", "when", "will", "would", "could", "should", "just", "very", "really",
              "today", "tomorrow", "yesterday", "morning", "again", "over", "into", "your", "their",
              "them", "they", "have", "been", "were", "some", "more", "most", "much", "many", "let's"}
TOPIC_WORD_SIM = 0.45  # a word of the line this close to the topic puts the line on it
TOPIC_LINE_SIM = 0.5  # or the whole line this close to "talking about <topic>"


def _topic_matches(topic: str, ev: Evidence) -> bool:
    """Whether the line is about a topic: a shared word, a word close to it, or a close line."""
    text = ev.transcript.lower()
    if not text:
        return False
    stop = TOPIC_STOP | ENGLISH_COMMON
    topic_words = [w for w in re.findall(r"[^\W\d_]+", topic.lower()) if w not in stop and len(w) > 2]
    for w in topic_words:
        stem = w[:-1] if w.endswith("s") and len(w) > 4 else w
        if re.search(rf"\b{re.escape(stem)}", text):
            return True
    words = list(dict.fromkeys(w for w in re.findall(r"[^\W\d_']+", text) if w not in stop and len(w) > 2))
    enc = sentence_encoder()
    vecs = enc.encode([topic, f"talking about {topic}", ev.transcript] + words[:24])
    if words and float((vecs[3:] @ vecs[0]).max()) >= TOPIC_WORD_SIM:
        return True
    return float(vecs[1] @ vecs[2]) >= TOPIC_LINE_SIM


class TextExpert:
    name = "text"

    def propose(self, ev: Evidence, board: list[Proposal]) -> Proposal:
        d = ev.directives
        notes: list[str] = []
        emotion: tuple[EmotionLabel, float] | None = d.emotion
        # conditional instructions need the words: they come from the audio expert's post
        heard = any(p.expert == "audio" for p in board)
        if heard and ev.speaking:
            for label, k, topic in d.conditional:
                if _topic_matches(topic, ev):
                    emotion = (label, k)
                    notes.append(f"host: {label.value} when {topic}")
        gestures: list[Gesture] = []
        reading = ev.reading
        for kind, trigger in d.gestures.items():
            times: list[float] = []
            if trigger == "always":
                times = [ev.start + 0.2] if ev.speaking or ev.end - ev.start > 1.0 else []
            elif trigger.startswith("topic:"):
                if ev.speaking and _topic_matches(trigger[6:], ev):
                    times = [ev.start + 0.2]
            elif reading is not None and ev.speaking:
                times = [ev.at(a) - (0.5 if trigger == "question" else 0.0)
                         for a in reading.act_times(trigger)[:2]]
                if trigger == "emphasis" and ev.prosody is not None:
                    times = [ev.prosody_offset + e for e in ev.prosody.emphasis[:2]]
            for t in times:
                at = _in_shot(ev, t)
                if at is not None:
                    gestures.append(Gesture(kind=kind, at=at, duration=0.9, strength=1.0))
                    notes.append(f"host: {kind.value} on {trigger}")
        if d.emotion:
            notes.append(f"host: be {d.emotion[0].value}")
        if d.still:
            notes.append("host: keep the head still")
        smile = d.smile or None
        brow = d.brow_raise or None
        if not any([emotion, d.head_motion is not None, gestures, d.gaze, d.framing, smile, brow,
                    d.eye_openness]):
            return Proposal(expert=self.name, priority=Priority.INSTRUCTION, confidence=0.0,
                            rationale="")
        return Proposal(
            expert=self.name, priority=Priority.INSTRUCTION, confidence=0.9,
            emotion=emotion[0] if emotion else None,
            intensity=emotion[1] if emotion else None,
            smile=smile, brow_raise=brow, eye_openness=d.eye_openness,
            gestures=gestures, gaze=d.gaze, head_motion=d.head_motion, framing=d.framing,
            rationale="; ".join(dict.fromkeys(notes))[:300],
        )


NEGATIVES_ALWAYS = ["frozen face", "jitter", "flicker", "identity drift", "distorted teeth",
                    "extra faces"]
NEGATIVES_BY_EMOTION: dict[EmotionLabel, list[str]] = {
    E.sad: ["grin", "laughing", "cheerful expression"],
    E.angry: ["smiling", "laughing", "relaxed expression"],
    E.happy: ["frown", "tears", "scowl"],
    E.fearful: ["grin", "relaxed expression"],
    E.disgusted: ["grin", "warm smile"],
    E.surprised: ["bored expression", "half-closed eyes"],
    E.thoughtful: ["laughing", "wide grin"],
    E.neutral: ["exaggerated expression"],
}


class NegativeDirector:
    """Per shot: what must not happen, as hard limits and negative prompt terms."""

    name = "negative"

    def limits(self, ev: Evidence, emotion: EmotionLabel) -> Limits:
        d = ev.directives
        neg: list[str] = []
        reasons: list[str] = []
        lim = Limits()
        # 1. from the host's prohibitions
        if "smile" in d.forbid:
            lim = lim.tighten(Limits(smile_max=0.0))
            neg += ["smiling", "grin", "showing teeth in a smile"]
            reasons.append("host: no smiling")
        if "frown" in d.forbid:
            lim = lim.tighten(Limits(brow_frown_max=0.1))
            neg += ["frown", "furrowed brows"]
            reasons.append("host: no frowning")
        if "brow_raise" in d.forbid:
            lim = lim.tighten(Limits(brow_raise_max=0.1))
            neg.append("raised eyebrows")
        for f in sorted(d.forbid):
            if f.startswith("emotion:"):
                label = EmotionLabel(f.split(":", 1)[1])
                lim = lim.tighten(Limits(forbid_emotions={label}))
                neg.append(f"{label.value} expression")
                reasons.append(f"host: not {label.value}")
        if d.forbid_gestures:
            lim = lim.tighten(Limits(forbid_gestures=set(d.forbid_gestures)))
            neg += [f"head {k.value}" for k in sorted(d.forbid_gestures, key=lambda k: k.value)]
        if d.still:
            lim = lim.tighten(Limits(head_motion_max=0.0))
            neg += ["head movement", "nodding", "head turning"]
            reasons.append("host: still head")
        # 2. from the emotion: no grin in a sad shot
        neg += NEGATIVES_BY_EMOTION.get(emotion, [])
        if emotion in (E.sad, E.angry, E.fearful, E.disgusted):
            lim = lim.tighten(Limits(smile_max=0.05))
        if emotion == E.happy:
            lim = lim.tighten(Limits(brow_frown_max=0.2))
        # 3. a listener moves little and keeps its eyes on the speaker
        if ev.listening_to is not None and not ev.speaking:
            lim = lim.tighten(Limits(head_motion_max=0.35, gesture_strength_max=0.4,
                                     forbid_gestures={GestureKind.shake, GestureKind.lean}))
            neg += ["looking away from the speaker"]
            reasons.append(f"listening to character {ev.listening_to}: small motion")
        # 4. known failure modes
        if not ev.speaking:
            neg += ["mouth moving in silence", "talking", "open mouth"]
        else:
            neg += ["closed mouth while speaking", "lip sync drift"]
        neg += NEGATIVES_ALWAYS
        return lim.tighten(Limits(negatives=neg, reasons=reasons))

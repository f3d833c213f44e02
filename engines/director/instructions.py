"""The host's standing instructions, read into directives the experts act on.

An instruction is split into clauses; each clause is matched against
patterns for what a host asks of an avatar (an emotion, "no smiling", "don't
move your head", "nod when you agree", "look sad when talking about the
news", gaze, framing, expression tweaks). Clauses no pattern catches are
compared with example phrasings by sentence embedding, and taken only above
a similarity threshold; anything else is reported as not understood and
ignored. Text that tries to change the rules ("ignore your rules and ...")
matches nothing and so does nothing.

Later instructions override earlier ones on the same subject; "reset" (or
"forget the instructions") drops everything before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from engines.director.models import sentence_encoder
from engines.shared import SharedModel
from engines.storyline import EmotionLabel, Framing, GazeTarget, GestureKind

E = EmotionLabel

EMOTION_WORDS: dict[str, tuple[EmotionLabel, float]] = {
    # word: (emotion, intensity)
    "cheerful": (E.happy, 0.7), "happy": (E.happy, 0.7), "joyful": (E.happy, 0.8),
    "upbeat": (E.happy, 0.6), "excited": (E.happy, 0.85), "enthusiastic": (E.happy, 0.8),
    "friendly": (E.happy, 0.45), "warm": (E.happy, 0.4), "positive": (E.happy, 0.5),
    "glad": (E.happy, 0.6), "delighted": (E.happy, 0.8), "playful": (E.happy, 0.6),
    "sad": (E.sad, 0.7), "somber": (E.sad, 0.6), "sombre": (E.sad, 0.6), "melancholic": (E.sad, 0.6),
    "gloomy": (E.sad, 0.6), "sorrowful": (E.sad, 0.75), "unhappy": (E.sad, 0.6),
    "depressed": (E.sad, 0.8), "down": (E.sad, 0.5), "sympathetic": (E.sad, 0.4),
    "compassionate": (E.sad, 0.35), "mournful": (E.sad, 0.8),
    "angry": (E.angry, 0.7), "furious": (E.angry, 0.9), "mad": (E.angry, 0.7),
    "annoyed": (E.angry, 0.45), "irritated": (E.angry, 0.45), "stern": (E.angry, 0.35),
    "surprised": (E.surprised, 0.7), "amazed": (E.surprised, 0.8), "shocked": (E.surprised, 0.85),
    "astonished": (E.surprised, 0.8),
    "scared": (E.fearful, 0.7), "afraid": (E.fearful, 0.7), "nervous": (E.fearful, 0.5),
    "worried": (E.fearful, 0.5), "anxious": (E.fearful, 0.55), "frightened": (E.fearful, 0.75),
    "disgusted": (E.disgusted, 0.7), "grossed": (E.disgusted, 0.6),
    "thoughtful": (E.thoughtful, 0.6), "pensive": (E.thoughtful, 0.6),
    "curious": (E.thoughtful, 0.5), "contemplative": (E.thoughtful, 0.6),
    "neutral": (E.neutral, 0.0), "calm": (E.neutral, 0.0), "serious": (E.neutral, 0.0),
    "professional": (E.neutral, 0.0), "composed": (E.neutral, 0.0),
    # es / fr / de / it / pt
    "feliz": (E.happy, 0.7), "alegre": (E.happy, 0.7), "contento": (E.happy, 0.6),
    "fröhlich": (E.happy, 0.7), "glücklich": (E.happy, 0.7), "heureux": (E.happy, 0.7),
    "joyeux": (E.happy, 0.7), "felice": (E.happy, 0.7), "allegro": (E.happy, 0.7),
    "triste": (E.sad, 0.7), "traurig": (E.sad, 0.7), "wütend": (E.angry, 0.7),
    "enojado": (E.angry, 0.7), "enfadado": (E.angry, 0.7), "arrabbiato": (E.angry, 0.7),
}
STRONGER = {"very", "really", "extremely", "super", "so", "more", "much", "totally", "sehr", "muy",
            "très", "molto", "muito"}
WEAKER = {"slightly", "somewhat", "a bit", "a little", "bit", "little", "mildly", "less", "kind of",
          "un poco", "ein bisschen", "un peu"}
NEG = r"\b(?:don'?t|do not|never|no|stop|quit|avoid|without|not|nicht|nie|kein|ne|pas)\b"

TRIGGERS: dict[str, str] = {
    "agree": "agree", "agreeing": "agree", "agreement": "agree", "say yes": "agree",
    "disagree": "disagree", "disagreeing": "disagree", "say no": "disagree",
    "ask": "question", "asked": "question", "question": "question", "questions": "question",
    "emphasi": "emphasis", "stress": "emphasis", "important": "emphasis",
    "greet": "greeting", "hello": "greeting", "welcome": "greeting",
}

# example phrasings for clauses no pattern caught (embedding fallback)
INTENT_EXAMPLES: dict[str, tuple[str, ...]] = {
    "emotion:happy": ("be cheerful", "look happy", "put on a happy face", "be in a good mood",
                      "show some joy"),
    "emotion:sad": ("look sad", "be sorrowful", "show sadness", "look upset and down"),
    "emotion:angry": ("look angry", "be mad", "show some anger"),
    "emotion:surprised": ("look surprised", "act amazed"),
    "emotion:neutral": ("stay neutral", "keep a neutral face", "be calm and composed"),
    "still": ("don't move your head", "keep your head still", "stay perfectly still",
              "no head movement"),
    "animated": ("move your head more", "be more animated", "be expressive and lively"),
    "no_smile": ("don't smile", "no smiling", "keep a straight face"),
    "smile_more": ("smile more", "show a smile"),
    "gaze:camera": ("look at the camera", "keep eye contact", "look at me"),
    "gaze:away": ("look away", "look to the side"),
    "gaze:down": ("look down", "lower your eyes"),
    "gesture:nod": ("nod your head", "nod more"),
    "gesture:shake": ("shake your head",),
    "gesture:tilt": ("tilt your head",),
}
INTENT_THRESHOLD = 0.62
RESET = re.compile(r"\b(reset|forget|clear)\b.*\b(instructions?|everything|rules|that)\b|^reset$")


@dataclass(slots=True)
class Directives:
    """What the standing instructions ask for, resolved (later ones win)."""

    emotion: tuple[EmotionLabel, float] | None = None
    conditional: list[tuple[EmotionLabel, float, str]] = field(default_factory=list)  # topic
    head_motion: float | None = None
    still: bool = False
    gestures: dict[GestureKind, str] = field(default_factory=dict)  # kind -> trigger or "always"
    forbid_gestures: set[GestureKind] = field(default_factory=set)
    gaze: GazeTarget | None = None
    framing: Framing | None = None
    smile: float = 0.0  # expression offsets asked for
    brow_raise: float = 0.0
    eye_openness: float | None = None
    forbid: set[str] = field(default_factory=set)  # smile, frown, brow_raise, emotion:<label>
    understood: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.emotion:
            parts.append(f"{self.emotion[0].value}")
        parts += [f"{e.value} when {topic}" for e, _, topic in self.conditional]
        if self.still:
            parts.append("still head")
        elif self.head_motion is not None:
            parts.append(f"head motion {self.head_motion:.1f}")
        parts += [f"{k.value} ({v})" for k, v in self.gestures.items()]
        parts += [f"no {f}" for f in sorted(self.forbid)]
        if self.gaze:
            parts.append(f"gaze {self.gaze.value}")
        return ", ".join(parts) or "none"


def clauses(text: str) -> list[str]:
    text = text.replace("’", "'")
    parts = re.split(r"[.;!\n]+|,\s*(?:and|but|then)?\s*|\s+(?:and|but|then|also)\s+", text)
    return [p.strip(" ,:-\"'").lower() for p in parts if p and p.strip(" ,:-\"'")]


def _amount(clause: str) -> float:
    words = set(clause.split())
    if any(w in clause for w in WEAKER if " " in w) or words & {w for w in WEAKER if " " not in w}:
        return 0.6
    if words & STRONGER:
        return 1.25
    return 1.0


def _trigger(clause: str) -> str | None:
    m = re.search(r"\b(?:when(?:ever)?|if|while|each time|every time|as)\b(.*)", clause)
    if not m:
        return None
    rest = m.group(1)
    for key, trig in TRIGGERS.items():
        if re.search(rf"\b{key}", rest):
            return trig
    return "topic:" + rest.strip()


def _topic(clause: str) -> str | None:
    m = re.search(r"\b(?:when(?:ever)?|while|if)\b\s+(?:you(?:'re| are)?\s+)?(?:talk(?:ing)?|speak(?:ing)?|"
                  r"discuss(?:ing)?|mention(?:ing)?|it'?s|we talk|the topic is)?\s*(?:about|of)?\s*(.+)",
                  clause)
    if not m:
        return None
    topic = re.sub(r"^(?:the|a|an)\s+", "", m.group(1).strip())
    return topic or None


def _emotion_in(clause: str) -> tuple[EmotionLabel, float] | None:
    for word in re.findall(r"[^\W\d_]+", clause):
        if word in EMOTION_WORDS:
            label, k = EMOTION_WORDS[word]
            return label, min(1.0, k * _amount(clause))
    return None


def _intent_matrix() -> tuple[np.ndarray, list[str]]:
    names: list[str] = []
    texts: list[str] = []
    for name, examples in INTENT_EXAMPLES.items():
        names += [name] * len(examples)
        texts += list(examples)
    return sentence_encoder().encode(texts), names


INTENTS = SharedModel("instruction intent embeddings", _intent_matrix)


def _nearest_intent(clause: str) -> tuple[str, float]:
    mat, names = INTENTS.get()
    sims = mat @ sentence_encoder().encode([clause])[0]
    i = int(np.argmax(sims))
    return names[i], float(sims[i])


def _apply(d: Directives, clause: str, *, use_embeddings: bool) -> bool:
    """Read one clause into ``d``; False if it asks for nothing we know."""
    c = clause
    if re.search(r"[{}<>\[\]]|\"\s*:", c):
        return False  # markup or JSON is not an instruction (and not a way to set values)
    neg = re.search(NEG, c) is not None
    # head motion
    if re.search(r"\b(head|still|moving|move|motion|movement|steady|static|motionless)\b", c) and (
            neg and re.search(r"\b(move|moving|motion|movement)\b", c)
            or re.search(r"\b(keep|hold|stay|remain|be)\b.*\b(still|steady|static|motionless)\b", c)
            or re.search(r"\bno (head )?(motion|movement)\b", c)):
        d.still, d.head_motion = True, 0.0
        d.gestures.clear()
        return True
    if re.search(r"\b(more|very|be)\b.*\b(animated|lively|dynamic|expressive|energetic)\b|"
                 r"\bmove (your head )?more\b", c):
        d.still, d.head_motion = False, min(1.0, 0.8 * _amount(c))
        return True
    if re.search(r"\b(move|moving|motion) (your head )?less\b|\b(less|fewer) (head )?(motion|movement)|"
                 r"\bcalm(er)? (head|movement)|\bsubtle\b", c):
        d.still, d.head_motion = False, 0.2
        return True
    # gestures
    for kind, pat in ((GestureKind.nod, r"\bnod"), (GestureKind.shake, r"\bshak(e|ing)\b"),
                      (GestureKind.tilt, r"\btilt"), (GestureKind.lean, r"\blean")):
        if re.search(pat, c):
            if neg:
                d.forbid_gestures.add(kind)
                d.gestures.pop(kind, None)
            else:
                trig = _trigger(c)
                d.gestures[kind] = trig or "always"
                d.forbid_gestures.discard(kind)
                if d.still:
                    d.still, d.head_motion = False, 0.3
            return True
    # smiling
    if re.search(r"\b(smil\w*|grin\w*|straight face|poker face|laugh\w*)\b", c):
        if neg or "straight face" in c or "poker face" in c:
            d.forbid.add("smile")
            d.smile = 0.0
        else:
            d.forbid.discard("smile")
            d.smile = 0.35 * _amount(c)
        return True
    if re.search(r"\b(frown\w*|scowl\w*)\b", c):
        if neg:
            d.forbid.add("frown")
        else:
            d.forbid.discard("frown")
        return True
    if re.search(r"\b(eyebrows?|brows?)\b", c):
        if neg:
            d.forbid.add("brow_raise")
            d.brow_raise = 0.0
        else:
            d.brow_raise = 0.4 * _amount(c)
        return True
    if re.search(r"\beyes? (wide|wider)|\bwide[- ]eyed\b", c):
        d.eye_openness = 1.2
        return True
    # gaze
    m = re.search(r"\blook(?:ing)? (at (?:the |me|us|viewers)|into the|straight|down|away|aside|"
                  r"to the side|elsewhere|sideways)|\beye contact\b|\bgaze\b", c)
    if m:
        if "down" in c:
            target = GazeTarget.down
        elif re.search(r"away|aside|side|elsewhere|sideways", c) or (neg and "eye contact" in c):
            target = GazeTarget.away
        else:
            target = GazeTarget.camera
        if neg and target == GazeTarget.camera and "eye contact" not in c:
            target = GazeTarget.away
        d.gaze = target
        return True
    # framing
    if re.search(r"\b(close[- ]?up|zoom(ed)? in|closer)\b", c):
        d.framing = Framing.close_up
        return True
    if re.search(r"\b(wide shot|zoom(ed)? out|wider|full shot)\b", c):
        d.framing = Framing.wide
        return True
    if re.search(r"\bmedium shot\b", c):
        d.framing = Framing.medium
        return True
    # emotions, perhaps conditional on a topic, perhaps forbidden
    emo = _emotion_in(c)
    if emo is not None:
        label, k = emo
        topic = _topic(c)
        if neg and not topic:
            d.forbid.add(f"emotion:{label.value}")
            if d.emotion and d.emotion[0] == label:
                d.emotion = None
            if label == E.happy:
                d.forbid.add("smile")
            return True
        if topic:
            d.conditional = [x for x in d.conditional if x[2] != topic] + [(label, k, topic)]
        else:
            d.emotion = (label, k)
            d.forbid.discard(f"emotion:{label.value}")
            if label == E.happy:
                d.forbid.discard("smile")
        return True
    if not use_embeddings or len(c.split()) > 12:
        return False
    intent, sim = _nearest_intent(c)
    if sim < INTENT_THRESHOLD:
        return False
    what, _, arg = intent.partition(":")
    if what == "emotion":
        d.emotion = (E(arg), 0.0 if arg == "neutral" else 0.65)
    elif what == "still":
        d.still, d.head_motion = True, 0.0
        d.gestures.clear()
    elif what == "animated":
        d.still, d.head_motion = False, 0.8
    elif what == "no_smile":
        d.forbid.add("smile")
    elif what == "smile_more":
        d.smile = 0.35
    elif what == "gaze":
        d.gaze = GazeTarget(arg)
    elif what == "gesture":
        d.gestures[GestureKind(arg)] = "always"
    return True


def read_instructions(instructions: list[str], *, use_embeddings: bool = True) -> Directives:
    """Directives from the standing instructions, oldest first (later ones win)."""
    d = Directives()
    for text in instructions:
        for c in clauses(text):
            if RESET.search(c):  # drops everything said before
                d = Directives(understood=[c])
            elif _apply(d, c, use_embeddings=use_embeddings):
                d.understood.append(c)
            else:
                d.ignored.append(c)
    return d

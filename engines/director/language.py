"""What a line of speech means for the face: emotion, intensity, dialogue acts.

Two kinds of evidence, combined:

* the sentence embedding (all-MiniLM-L6-v2) of the line against labelled
  prototype sentences per emotion (the mean of the two nearest per label);
* a lexicon, which handles what embeddings get wrong: negation ("I'm not
  happy about this"), sarcasm (praise for a bad situation), intensifiers,
  and a few common emotion words in Spanish, French, German, Italian and
  Portuguese (the embedding model is English-only, so for other languages
  only the lexicon speaks, and with little evidence the line stays neutral).

Dialogue acts (agreement, disagreement, question, greeting) come with their
position in the line, so gestures can be timed on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from engines.director.models import sentence_encoder
from engines.shared import SharedModel
from engines.storyline import EmotionLabel

E = EmotionLabel

PROTOTYPES: dict[EmotionLabel, tuple[str, ...]] = {
    E.neutral: (
        "The meeting starts at three o'clock in room four.",
        "Here is the list of items for today.",
        "The package weighs about two kilograms.",
        "Next we will look at the second chapter.",
        "The train leaves from platform six.",
        "Let me explain how the settings work.",
        "This model has four wheels and a small engine.",
        "Please open the file and scroll down.",
        "Okay, let's move on to the next part.",
        "Is everyone ready to begin?",
        "I'll be right back after this short break.",
        "So that's how the feature works.",
        "Let me check the chat for your questions.",
        "You can find the link in the description below.",
    ),
    E.happy: (
        "I'm so happy, this is wonderful news!",
        "We did it, what a fantastic day!",
        "I love this, it makes me smile.",
        "Thank you so much, I'm delighted.",
        "That is great, congratulations to the whole team!",
        "What a lovely surprise, I'm thrilled.",
        "This is the best thing that happened all year.",
        "I'm really excited to share this with you.",
    ),
    E.sad: (
        "I'm so sorry for your loss.",
        "It breaks my heart to say goodbye.",
        "I feel lonely and down today.",
        "Unfortunately, the project has failed and everyone lost their jobs.",
        "We miss him every single day.",
        "This is tragic news for the families.",
        "I'm disappointed and a bit heartbroken.",
        "Nothing seems to go right anymore.",
    ),
    E.angry: (
        "This is completely unacceptable!",
        "I'm furious about what they did.",
        "How dare you speak to me like that!",
        "Stop lying to me, I'm sick of it!",
        "They ignored us again and I'm outraged.",
        "I am so angry I could scream.",
        "That was a deliberate insult and I won't tolerate it.",
    ),
    E.surprised: (
        "Wow, I did not expect that at all!",
        "No way, really? That's incredible!",
        "What? When did this happen?",
        "Oh my goodness, look at that!",
        "I can't believe it, that's amazing!",
        "Whoa, that came out of nowhere.",
    ),
    E.fearful: (
        "I'm scared something terrible will happen.",
        "Please be careful, this is dangerous.",
        "I'm worried and anxious about tomorrow.",
        "Did you hear that noise? I'm frightened.",
        "What if we don't make it out in time?",
        "I'm nervous about the results.",
    ),
    E.disgusted: (
        "Ugh, that smells disgusting.",
        "That is gross, I feel sick.",
        "How revolting, get it away from me.",
        "Their behaviour was vile and repulsive.",
        "Yuck, there's mold all over the bread.",
    ),
    E.thoughtful: (
        "Hmm, let me think about that for a moment.",
        "That's an interesting question, I'm not sure yet.",
        "I wonder whether there's a better way to do this.",
        "Let's consider the options carefully.",
        "Perhaps we should look at it from another angle.",
        "Well, it depends on how you define it.",
    ),
}

LEXICON: dict[EmotionLabel, tuple[str, ...]] = {
    E.happy: (
        "happy", "glad", "delighted", "thrilled", "excited", "love", "loved", "wonderful",
        "fantastic", "great", "awesome", "amazing", "joy", "joyful", "cheerful", "congratulations",
        "yay", "hooray", "celebrate", "excellent", "brilliant", "proud", "grateful", "lovely",
        "enjoy", "enjoyed", "liked", "fun", "perfect", "good", "nice", "beautiful", "best",
        # es / pt / it / fr / de
        "feliz", "alegre", "contento", "contenta", "encantado", "genial", "felice", "allegro",
        "bellissimo", "heureux", "heureuse", "joyeux", "content", "génial", "glücklich",
        "fröhlich", "froh", "toll", "wunderbar", "ótimo", "maravilhoso", "maravilloso",
    ),
    E.sad: (
        "sad", "sorry", "unhappy", "depressed", "heartbroken", "grief", "lonely", "miss",
        "missed", "tragic", "tragedy", "loss", "lost", "cry", "crying", "tears", "disappointed",
        "unfortunately", "died", "passed", "funeral", "mourn", "down", "gloomy", "hopeless",
        "bad", "terrible", "awful",
        "triste", "tristes", "deprimido", "lamento", "perdimos", "traurig", "leider",
        "malheureux", "désolé", "perdu", "tristezza", "saudade",
    ),
    E.angry: (
        "angry", "furious", "outraged", "mad", "annoyed", "irritated", "hate", "unacceptable",
        "ridiculous", "disgrace", "fed", "sick", "rage", "livid", "dare", "infuriating",
        "enojado", "enfadado", "furioso", "wütend", "sauer", "ärgerlich", "colère", "fâché",
        "furieux", "arrabbiato", "irritado",
    ),
    E.surprised: (
        "wow", "whoa", "unbelievable", "incredible", "surprised", "surprise", "shocked",
        "astonished", "unexpected", "really", "omg", "believe",
        "sorpresa", "increíble", "überrascht", "unglaublich", "surpris", "incroyable",
        "sorpreso", "incrível",
    ),
    E.fearful: (
        "scared", "afraid", "fear", "terrified", "frightened", "worried", "anxious", "nervous",
        "dangerous", "danger", "panic", "careful", "threat", "worry",
        "miedo", "asustado", "angst", "peur", "paura", "medo",
    ),
    E.disgusted: (
        "disgusting", "gross", "yuck", "ugh", "revolting", "vile", "repulsive", "nasty",
        "eww", "ew", "sickening",
        "asco", "asqueroso", "ekelhaft", "dégoûtant", "schifo", "nojo",
    ),
    E.thoughtful: (
        "hmm", "think", "wonder", "perhaps", "maybe", "consider", "depends", "suppose",
        "interesting", "curious", "ponder", "unsure",
    ),
}
_WORD_LABEL: dict[str, EmotionLabel] = {}
for _label, _words in LEXICON.items():
    for _w in _words:
        _WORD_LABEL.setdefault(_w, _label)
# words that carry emotion only weakly (common in plain speech)
WEAK = {"good", "nice", "great", "best", "really", "believe", "down", "bad", "lost", "miss",
        "think", "maybe", "perhaps", "love", "fun", "sick", "fed", "passed", "careful", "perfect",
        "interesting", "curious", "content", "toll"}

NEGATORS = {"not", "no", "never", "n't", "dont", "don't", "isn't", "wasn't", "aren't", "didn't",
            "doesn't", "won't", "can't", "cannot", "hardly", "nothing", "without", "neither", "nor",
            "ain't", "couldn't", "wouldn't", "nicht", "kein", "keine", "pas", "jamais", "nunca",
            "nada", "non", "não"}
CLAUSE_BREAKS = {"but", "although", "though", "however", "yet", "because", "!", "?"}
INTENSIFIERS = {"very", "so", "really", "extremely", "incredibly", "absolutely", "totally",
                "super", "truly", "deeply", "utterly", "such", "completely", "sehr", "muy",
                "très", "molto", "muito"}
SOFTENERS = {"slightly", "somewhat", "bit", "little", "kinda", "kind", "sort", "fairly",
             "rather", "mildly", "quite"}
# praise words and the situations that turn praise into sarcasm
SARCASM_PRAISE = {"great", "wonderful", "fantastic", "perfect", "lovely", "brilliant", "awesome",
                  "love", "thrilled", "nice", "amazing", "fabulous", "splendid", "marvelous"}
SARCASM_SITUATION = {"another", "again", "stuck", "broke", "broken", "rain", "raining", "traffic",
                     "monday", "late", "delayed", "cancelled", "canceled", "crashed", "lost",
                     "flat", "fired", "overtime", "queue", "waiting", "bill", "bills", "taxes",
                     "spilled", "forgot", "meetings", "homework", "deadline", "just what",
                     "exactly what", "yeah right", "as if", "oh sure", "thanks a lot", "how lovely",
                     "of course it", "sure,", "can't wait to"}
SARCASM_OPENERS = ("oh great", "oh wonderful", "oh perfect", "oh fantastic", "oh joy", "oh lovely",
                   "just great", "just perfect", "yeah right", "oh sure", "great, just",
                   "wonderful, just", "perfect, just", "thanks a lot", "oh brilliant", "oh how nice")

AGREE = ("yes", "yeah", "yep", "absolutely", "exactly", "agree", "agreed", "definitely",
         "of course", "sure", "right", "indeed", "certainly", "correct", "true", "totally",
         "sí", "oui", "ja", "sim", "d'accord")
DISAGREE = ("no", "nope", "disagree", "wrong", "not really", "don't think so", "do not think so",
            "not at all", "no way", "never", "nah", "not true", "incorrect", "nein", "non")
GREETINGS = ("hello", "hi", "hey", "welcome", "good morning", "good evening", "goodbye", "bye",
             "thanks", "thank you", "hola", "bonjour", "hallo", "ciao", "olá")
QUESTION_OPENERS = ("what", "why", "how", "when", "where", "who", "which", "do", "does", "did",
                    "is", "are", "can", "could", "would", "should", "will", "have", "has")
ENGLISH_COMMON = {"the", "a", "an", "is", "are", "was", "i", "you", "we", "it", "this", "that",
                  "to", "of", "and", "in", "on", "for", "with", "my", "your", "so", "be", "not",
                  "what", "how", "me", "do", "at", "just", "they", "he", "she", "our", "have",
                  "im", "i'm", "it's", "oh", "yes", "no", "all", "can", "will", "about", "today"}

_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?|[!?]", re.UNICODE)


def tokens(text: str) -> list[str]:
    return [t.lower().replace("’", "'") for t in _TOKEN.findall(text)]


def _split_negation(toks: list[str]) -> list[str]:
    out: list[str] = []
    for t in toks:
        if t.endswith("n't") and len(t) > 3:
            out += [t[:-3], "n't"]
        else:
            out.append(t)
    return out


@dataclass(slots=True)
class Act:
    kind: str  # agree, disagree, question, greeting, exclaim
    at: float  # position in the line, 0..1 (character fraction)


@dataclass(slots=True)
class Reading:
    """What one line means for the face."""

    text: str
    emotion: EmotionLabel = EmotionLabel.neutral
    intensity: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    acts: list[Act] = field(default_factory=list)
    english: bool = True
    sarcasm: bool = False
    notes: list[str] = field(default_factory=list)

    def has_act(self, kind: str) -> bool:
        return any(a.kind == kind for a in self.acts)

    def act_times(self, kind: str) -> list[float]:
        return [a.at for a in self.acts if a.kind == kind]


def is_english(toks: list[str]) -> bool:
    words = [t for t in toks if t not in "!?"]
    if not words:
        return True
    common = sum(t in ENGLISH_COMMON for t in words)
    if len(words) <= 3:
        return common >= 1 or all(t.isascii() for t in words) and not any(
            t in _WORD_LABEL and not t.isascii() for t in words)
    return common / len(words) >= 0.12


def _find_phrases(text_l: str, phrases: tuple[str, ...]) -> list[float]:
    """Character fractions where whole-word phrases occur."""
    out = []
    n = max(len(text_l), 1)
    for p in phrases:
        for m in re.finditer(rf"(?<![\w']){re.escape(p)}(?![\w'])", text_l):
            out.append(m.start() / n)
    return sorted(out)


def dialogue_acts(text: str) -> list[Act]:
    text_l = text.lower().replace("’", "'")
    acts: list[Act] = []
    disagree = _find_phrases(text_l, DISAGREE)
    # "no" in "no problem", "no doubt" is not disagreement
    disagree = [a for a in disagree
                if not re.match(r"no (problem|doubt|worries|question)", text_l[int(a * len(text_l)):])]
    agree = _find_phrases(text_l, AGREE)
    # "not right", "not true", "not sure", "not correct" is not agreement
    agree = [a for a in agree if not re.search(r"(not|n't)\s+$", text_l[: int(a * len(text_l))])]
    if "i'm not sure" in text_l or "not sure" in text_l:
        agree = [a for a in agree if not text_l[int(a * len(text_l)):].startswith("sure")]
    acts += [Act("agree", a) for a in agree]
    acts += [Act("disagree", a) for a in disagree]
    acts += [Act("greeting", a) for a in _find_phrases(text_l, GREETINGS)]
    for m in re.finditer(r"[^.!?]*\?", text):
        acts.append(Act("question", m.end() / max(len(text), 1)))
    if "?" not in text:
        first = tokens(text)[:1]
        if first and first[0] in QUESTION_OPENERS[:7] and len(tokens(text)) > 2:
            acts.append(Act("question", 1.0))
    for m in re.finditer(r"!", text):
        acts.append(Act("exclaim", m.start() / max(len(text), 1)))
    acts.sort(key=lambda a: a.at)
    return acts


def _prototype_matrix() -> tuple[np.ndarray, list[EmotionLabel]]:
    labels: list[EmotionLabel] = []
    texts: list[str] = []
    for label, sents in PROTOTYPES.items():
        labels += [label] * len(sents)
        texts += list(sents)
    return sentence_encoder().encode(texts), labels


PROTOTYPES_MATRIX = SharedModel("emotion prototype embeddings", _prototype_matrix)


def embedding_scores(text: str) -> dict[EmotionLabel, float]:
    """Mean cosine of the two nearest prototypes per label."""
    mat, labels = PROTOTYPES_MATRIX.get()
    v = sentence_encoder().encode([text])[0]
    sims = mat @ v
    out: dict[EmotionLabel, float] = {}
    for label in PROTOTYPES:
        s = np.sort(sims[[i for i, lb in enumerate(labels) if lb == label]])[::-1]
        out[label] = float(s[:2].mean())
    return out


def lexicon_scores(toks: list[str]) -> tuple[dict[EmotionLabel, float], list[str], float]:
    """Lexicon evidence per label, notes, and an intensity modifier."""
    toks = _split_negation(toks)
    out = {label: 0.0 for label in PROTOTYPES}
    notes: list[str] = []
    boost = 0.0
    for i, t in enumerate(toks):
        if t in INTENSIFIERS:
            boost += 0.15
        elif t in SOFTENERS:
            boost -= 0.15
        label = _WORD_LABEL.get(t)
        if label is None:
            continue
        weight = 0.5 if t in WEAK else 1.0
        # negation scope: up to four words back, not across a clause boundary
        window: list[str] = []
        for w in reversed(toks[max(0, i - 4): i]):
            if w in CLAUSE_BREAKS:
                break
            window.append(w)
        negated = any(w in NEGATORS for w in window)
        if negated:
            notes.append(f"negated '{t}'")
            if label == E.happy:
                out[E.sad] += 1.0 * weight
            elif label in (E.sad, E.angry, E.fearful, E.disgusted):
                out[E.neutral] += 0.6 * weight
            # the embedding still hears the word: outweigh it
            out[label] -= 2.0 * weight
        else:
            out[label] += weight
    return out, notes, boost


def detect_sarcasm(text: str, toks: list[str]) -> bool:
    text_l = text.lower().replace("’", "'")
    if any(text_l.lstrip(" \"'").startswith(o) for o in SARCASM_OPENERS):
        return True
    praise = any(t in SARCASM_PRAISE for t in toks)
    situation = sum(1 for s in SARCASM_SITUATION if (" " in s and s in text_l) or s in toks)
    return praise and situation >= 2 or praise and situation >= 1 and "just what" in text_l


def read_line(text: str) -> Reading:
    """Emotion, intensity and dialogue acts of one line (deterministic)."""
    text = text.strip()
    if not text:
        return Reading(text="", notes=["no words"])
    toks = tokens(text)
    english = is_english(toks)
    lex, notes, boost = lexicon_scores(toks)
    reading = Reading(text=text, english=english, notes=notes, acts=dialogue_acts(text))
    if english:
        emb = embedding_scores(text)
        # relative to the line's own baseline: how much closer to each label than to neutral
        base = emb[E.neutral]
        scores = {label: (emb[label] - base) + 0.10 * lex[label] for label in PROTOTYPES}
        if any(abs(v) > 0 for v in lex.values()):
            # the line has explicit emotion words: labels with no word for them count half
            scores = {label: v * 0.5 if lex[label] == 0 and v > 0 else v for label, v in scores.items()}
            # a negated word's label cannot win on the embedding, which still hears the word
            scores = {label: min(v, 0.0) if lex[label] < 0 else v for label, v in scores.items()}
        scores[E.neutral] = 0.02 + 0.10 * lex[E.neutral]
    else:
        notes.append("not English: lexicon only")
        scores = {label: 0.12 * lex[label] for label in PROTOTYPES}
        scores[E.neutral] = 0.05 + 0.12 * lex[E.neutral]
    if detect_sarcasm(text, toks):
        reading.sarcasm = True
        notes.append("sarcasm: praise for a bad situation")
        scores[E.disgusted] = max(scores.values()) + 0.05
        scores[E.happy] = min(scores[E.happy], 0.0)
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    label, top = ranked[0]
    second = ranked[1][1]
    reading.scores = {k.value: round(v, 3) for k, v in ranked}
    reading.emotion = label
    if label == E.neutral:
        reading.intensity = 0.0
        return reading
    exclaim = min(text.count("!"), 3) * 0.08
    caps = 0.1 if sum(c.isupper() for c in text) > 0.5 * max(sum(c.isalpha() for c in text), 1) else 0
    base_k = 0.45 + 2.0 * (top - max(second, scores[E.neutral]))
    reading.intensity = float(np.clip(base_k + boost + exclaim + caps, 0.25, 1.0))
    if reading.sarcasm:
        reading.intensity = min(reading.intensity, 0.5)
    return reading

"""Wire messages on a session's ``control`` data channel, in and out (JSON objects with a ``type``).

Client to server: ``say`` (text, and who says it with which voice:
``{"type": "say", "text": ..., "character": 1, "voice": "joe"}``),
``instruct``, ``interrupt`` and ``mic`` (whom the host's microphone speaks
for: ``{"type": "mic", "character": 0}``). Character 0 is the leftmost face
of the avatar, 1 the other one in a two-person photo; both default to 0.
Server to client: ``stats`` (about once a second), ``ack`` (an instruction,
interrupt or mic route was applied, and from which pts) and ``error`` (a
message was refused, and why). Anything else gets an ``error`` that says
what was expected.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from engines.storyline import Shot
from realtime.tts import DEFAULT_VOICE, MAX_SAY_CHARS, check_voice, clean_text

MAX_CONTROL_BYTES = 64 * 1024
MAX_INSTRUCTION_CHARS = 2000
MAX_CHARACTERS = 2  # characters one avatar can have (0 and 1)
IN_TYPES = ("say", "instruct", "interrupt", "mic")


class MessageError(ValueError):
    """A control message that cannot be applied; the text is what the client is told."""


def _say_text(value: str) -> str:
    return clean_text(value, limit=MAX_SAY_CHARS, what="say text")


def _instruction(value: str) -> str:
    return clean_text(value, limit=MAX_INSTRUCTION_CHARS, what="instruction")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _character(value: int) -> int:
    if not 0 <= value < MAX_CHARACTERS:
        raise ValueError(f"character {value} does not exist: an avatar has characters 0 and 1 "
                         f"at most (0 is the leftmost face)")
    return value


Character = Annotated[int, Field(strict=True), AfterValidator(_character)]


class Say(_In):
    type: Literal["say"]
    text: Annotated[str, AfterValidator(_say_text)]
    character: Character = 0
    voice: Annotated[str, AfterValidator(check_voice)] = DEFAULT_VOICE


class Instruct(_In):
    type: Literal["instruct"]
    text: Annotated[str, AfterValidator(_instruction)]


class Interrupt(_In):
    type: Literal["interrupt"]


class Mic(_In):
    """Route the host's microphone to ``character`` from now on."""

    type: Literal["mic"]
    character: Character = 0


InMessage = Say | Instruct | Interrupt | Mic
ControlMessage = Annotated[InMessage, Field(discriminator="type")]
_CONTROL: TypeAdapter[InMessage] = TypeAdapter(ControlMessage)


def parse_control(raw: str | bytes) -> InMessage:
    """One message from the wire; ``MessageError`` with a clear reason for anything else."""
    if len(raw) > MAX_CONTROL_BYTES:
        unit = "bytes" if isinstance(raw, bytes) else "characters"
        raise MessageError(f"message is {len(raw)} {unit}; the limit is {MAX_CONTROL_BYTES}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError("message is not UTF-8 JSON") from None
    try:
        data: Any = json.loads(raw)
    except ValueError:
        raise MessageError("message is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise MessageError('message must be a JSON object with a "type"')
    if data["type"] not in IN_TYPES:
        raise MessageError(f"unknown message type {data['type']!r} (expected {', '.join(IN_TYPES)})")
    try:
        return _CONTROL.validate_python(data)
    except ValidationError as exc:
        raise MessageError(_describe(data["type"], exc)) from None


def _describe(kind: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"][1:]) or "message"
    if err["type"] == "value_error":  # our own validators: their message says it all
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if err["type"] == "extra_forbidden":
        return f"{kind}: unexpected field {field!r}"
    if err["type"] == "missing":
        return f"{kind}: {field!r} is missing"
    return f"{kind}: {field}: {err['msg']}"


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    def wire(self) -> str:
        return self.model_dump_json(by_alias=True)


class Ack(_Out):
    type: Literal["ack"] = "ack"
    for_: str = Field(alias="for")
    from_pts: float


class Error(_Out):
    type: Literal["error"] = "error"
    message: str


class Stats(_Out):
    """A session's live figures (what the page shows and ``GET /v1/sessions/{id}`` returns)."""

    type: Literal["stats"] = "stats"
    session: str
    t: float
    started_at: float = Field(0.0, description="when the session started (Unix time)")
    fps: float
    latency_ms: float | None = Field(description="p95, audio arrival to frame hand-off")
    latency_p50_ms: float | None
    pipeline_delay_ms: float
    implied_latency_ms: float
    av_offset_ms: float
    frames_sent: int
    viewers: int = Field(0, description="WHEP viewers watching now")
    video_encoded: dict[str, int] = Field(
        default_factory=dict, description="frames encoded per codec: once per frame, for every output")
    video_delivered: int = Field(0, description="encoded frames handed to outputs, one per output")
    audio_encoded: int = Field(0, description="voice packets (40 ms of Opus) encoded")
    audio_delivered: int = Field(0, description="voice packets handed to outputs, one per output")
    held_frames: int
    late_frames: int
    dropped_frames: int
    clips_skipped: int
    render_ms: float
    render_margin_ms: float | None
    mic_lag_ms: float | None
    subclip_ms: float
    workers: int
    speaking: bool
    director: str
    director_failures: int
    plan_ms: float | None = Field(description="median time the director took per window, recent windows")
    director_fallbacks: int
    instructions: int
    plan_generation: int
    stale_windows: int
    forced_keyframes: int
    shot: Shot | None = Field(description="character 0's shot playing now")
    characters: int = Field(1, description="faces the avatar animates (0 is the leftmost)")
    mic_character: int = Field(0, description="whom the host's microphone speaks for")
    shots: list[Shot | None] = Field(default_factory=list,
                                     description="each character's shot playing now")
    egresses: int = Field(0, description="streams to platforms (RTMP) this session pushes")


OutMessage = Ack | Error | Stats

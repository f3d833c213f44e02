"""The host's control of one session: wire messages checked and turned into events.

``say`` goes to the speech input (as the character it names); ``instruct``
becomes an ``Instructed`` event for the planner; ``interrupt`` stops the
speech being prepared, silences queued speech from the next sub-clip
boundary and tells the planner and the scheduler (``Interrupted``); ``mic``
routes the microphone to a character (``MicRouted`` to the ingest, which
applies it to the audio that arrives from now on, and to the planner). A
message for a character the avatar does not have is refused. Nothing here
waits for a stage: the answer (``ack`` with the pts the change applies from,
or ``error``) goes out at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from realtime.clock import Clock
from realtime.events import (
    Inbox,
    IngestEvent,
    Instructed,
    Interrupted,
    MicRouted,
    PlannerEvent,
    SchedulerEvent,
)
from realtime.speech import SpeechInput
from realtime.timeline import AudioTimeline
from server.messages import (
    Ack,
    Error,
    Instruct,
    Interrupt,
    MessageError,
    Mic,
    OutMessage,
    Say,
    parse_control,
)

log = logging.getLogger(__name__)

INSTRUCT_AFTER_FRAMES = 2  # an instruction applies from this many frames after the one playing
INTERRUPT_AFTER_FRAMES = 1


class SessionControl:
    def __init__(self, *, clock: Clock, fps: int, delay_s: float, subclip_s: float,
                 speech: SpeechInput, timeline: AudioTimeline, planner: Inbox[PlannerEvent],
                 scheduler: Inbox[SchedulerEvent], ingest: Inbox[IngestEvent],
                 send: Callable[[OutMessage], None], characters: int = 1,
                 session_id: str = "") -> None:
        self.clock = clock
        self.fps = fps
        self.delay_s = delay_s
        self.subclip_s = subclip_s
        self.speech = speech
        self.timeline = timeline
        self.planner = planner
        self.scheduler = scheduler
        self.ingest = ingest
        self.characters = characters
        self.mic_character = 0
        self.send = send
        self.session_id = session_id
        self.errors_sent = 0
        self.instructions = 0

    def playing_pts(self) -> float:
        """The pts now leaving (audio master clock)."""
        return max(self.clock.now() - self.delay_s, 0.0)

    def _boundary_after(self, frames: int) -> float:
        """The first sub-clip boundary at least ``frames`` after the frame playing now."""
        t = self.playing_pts() + frames / self.fps
        return math.ceil(t / self.subclip_s - 1e-9) * self.subclip_s

    def error(self, message: str) -> None:
        self.errors_sent += 1
        self.send(Error(message=message))

    def handle(self, raw: str | bytes) -> None:
        """One message from the data channel."""
        try:
            msg = parse_control(raw)
        except MessageError as exc:
            return self.error(str(exc))
        if isinstance(msg, (Say, Mic)) and msg.character >= self.characters:
            faces = "one face (character 0)" if self.characters == 1 else \
                f"{self.characters} faces (characters 0..{self.characters - 1})"
            return self.error(f"{msg.type}: character {msg.character} is not in this avatar: "
                              f"it has {faces}")
        if isinstance(msg, Say):
            self.speech.say(msg.text, msg.character, msg.voice)
        elif isinstance(msg, Instruct):
            self.instruct(msg.text)
        elif isinstance(msg, Interrupt):
            self.interrupt()
        elif isinstance(msg, Mic):
            self.route_mic(msg.character)

    def route_mic(self, character: int) -> float:
        """The microphone speaks for ``character`` from now on; returns the pts it applies from."""
        now = self.clock.now()  # mic audio is placed on the session clock by its arrival
        self.mic_character = character
        event = MicRouted(character, now)
        self.ingest.post(event)
        self.planner.post(event)
        self.send(Ack(for_="mic", from_pts=round(now, 3)))
        return now

    def instruct(self, text: str) -> float:
        """A standing instruction from the next frames on; returns the pts it applies from."""
        cut = self.playing_pts() + INSTRUCT_AFTER_FRAMES / self.fps
        self.instructions += 1
        self.planner.post(Instructed(text, cut))
        self.send(Ack(for_="instruct", from_pts=round(cut, 3)))
        return cut

    def interrupt(self) -> float:
        """Cut speech off from the next sub-clip boundary; returns that pts."""
        self.speech.stop()
        cut = self._boundary_after(INTERRUPT_AFTER_FRAMES)
        self.timeline.cut_tts(cut)
        event = Interrupted(cut)
        self.scheduler.post(event)
        self.planner.post(event)
        self.send(Ack(for_="interrupt", from_pts=round(cut, 3)))
        return cut

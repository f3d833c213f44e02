"""WebRTC signalling for one session: SDP offers checked and answered, the peers wired up.

The session's own peer carries one audio transceiver (the host's microphone
up, the avatar's voice down), one video transceiver (the avatar, sent only)
and a data channel named ``control``. The microphone goes to the session's
ingest, control messages to its control. A WHEP viewer (``ViewerPeer``) is a
peer of its own that only receives: video and voice, no microphone, no data
channel. Every peer sends the session's encoded outputs, each in its own
negotiated codec, so a viewer costs packetizing, not encoding.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import SessionDescription

from realtime.tracks import EncodedAudioTrack, EncodedVideoTrack

if TYPE_CHECKING:
    from server.session import Session

log = logging.getLogger(__name__)


MAX_SDP_BYTES = 64 * 1024


class OfferError(ValueError):
    """The SDP offer cannot be answered (malformed, or missing what we need)."""


def check_offer(sdp: str, *, audio: str = "sendrecv") -> None:
    """Reject what is plainly not an offer we can answer, before aiortc sees it.

    ``audio`` is the direction the offer's audio should have, for the message.
    """
    if "v=0" not in sdp or "m=" not in sdp:
        raise OfferError("body is not an SDP offer (expected 'v=0' and media sections)")
    kinds = [line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and line.split()]
    if "video" not in kinds:
        raise OfferError("the offer has no video section (add a recvonly video transceiver)")
    if "audio" not in kinds:
        raise OfferError(f"the offer has no audio section (add a {audio} audio transceiver)")


def check_viewer_offer(sdp: str) -> None:
    """A WHEP offer receives audio and video: what ``check_offer`` asks, each section able to receive."""
    check_offer(sdp, audio="recvonly")
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        kind = section[2:].split(" ", 1)[0]
        if kind in ("audio", "video") and re.search(r"^a=(sendonly|inactive)\s*$", section, re.M):
            raise OfferError(f"the offer's {kind} section does not receive: a WHEP viewer offers "
                             f"recvonly audio and video")


def prefer_codecs(transceiver: RTCRtpTransceiver, names: Sequence[str]) -> None:
    """Offer-answer picks the first of ``names`` the offer has (rtx kept for retransmissions)."""
    caps = RTCRtpSender.getCapabilities("video")
    preferred = [c for name in names for c in caps.codecs if c.mimeType.lower() == f"video/{name.lower()}"]
    if preferred:
        transceiver.setCodecPreferences(preferred + [c for c in caps.codecs if c.mimeType.endswith("rtx")])


def answered_video_codec(answer_sdp: str) -> str:
    """The codec an answer sends video with: the first of its video section."""
    desc = SessionDescription.parse(answer_sdp)
    for media in desc.media:
        if media.kind == "video" and media.rtp.codecs:
            return str(media.rtp.codecs[0].mimeType.split("/", 1)[1]).upper()
    raise OfferError("the answer has no video codec in common with the offer (send VP8 or H.264)")


MIC_PREFETCH = 1  # audio packets aiortc holds back before decoding one (its default, 4, is 80 ms)


def shorten_audio_jitter_buffer(receiver: Any) -> None:
    """Decode the microphone as soon as a packet is whole, not four packets later.

    aiortc's audio jitter buffer waits for 4 further packets (80 ms) before it
    releases one, to reorder late ones; the ingest places audio by arrival and
    reads a gap as silence, so that wait is pure latency here. aiortc has no
    setting for it: the attribute is private, so a change there is logged, not fatal.
    """
    buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
    if buffer is None or not hasattr(buffer, "_prefetch"):
        log.warning("aiortc's audio jitter buffer is not where it was: the microphone keeps its 80 ms wait")
        return
    buffer._prefetch = MIC_PREFETCH


class _OutputPeer:
    """A peer connection that sends the session's outputs: its video and its voice."""

    def __init__(self, session: Session, config: RTCConfiguration, video_codecs: Sequence[str]) -> None:
        self.session = session
        self.video_codecs = tuple(video_codecs)
        self.pc = RTCPeerConnection(configuration=config)
        self.video: EncodedVideoTrack | None = None
        self.audio: EncodedAudioTrack | None = None

    async def _answer(self, offer_sdp: str, audio_direction: str,
                      on_audio: Callable[[RTCRtpTransceiver], None] | None = None) -> str:
        """Apply the offer with our tracks on its first audio and video sections; the SDP answer."""
        pc, session = self.pc, self.session
        try:
            # codec choice only takes effect if set before the remote offer is applied
            video_tr = pc.addTransceiver("video", direction="sendonly")
            prefer_codecs(video_tr, self.video_codecs)
            self.video = EncodedVideoTrack(session.video_out)
            self.audio = EncodedAudioTrack(session.audio_out)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            audio_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "audio" and not audio_set:
                    tr.sender.replaceTrack(self.audio)
                    tr.direction = audio_direction
                    if on_audio is not None:
                        on_audio(tr)
                    audio_set = True
            video_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "video" and tr.mid is not None and not video_set:
                    tr.sender.replaceTrack(self.video)
                    tr.direction = "sendonly"
                    self.video.sender = tr.sender
                    video_set = True
            if not video_set:
                video_tr.sender.replaceTrack(self.video)
                self.video.sender = video_tr.sender
            await pc.setLocalDescription(await pc.createAnswer())
            answer = str(pc.localDescription.sdp)
            # the session encodes once in the codec this peer's answer sends
            self.video.use_codec(answered_video_codec(answer))
        except OfferError:
            raise
        except Exception as exc:  # aiortc raises many types on bad SDP
            raise OfferError(f"cannot answer the offer: {type(exc).__name__}: {exc}") from exc
        return answer

    async def close(self) -> None:
        for track in (self.video, self.audio):
            if track is not None:
                track.stop()
        await self.pc.close()


class WebRTCPeer(_OutputPeer):
    """The session's own peer connection: the host's microphone and control, the session's outputs."""

    def __init__(self, session: Session, config: RTCConfiguration,
                 video_codecs: Sequence[str] = ("H264", "VP8")) -> None:
        super().__init__(session, config, video_codecs)
        self.channel: Any = None

    def send(self, text: str) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(text)

    async def answer(self, offer_sdp: str) -> str:
        """Apply the client's offer and return our SDP answer (``OfferError`` if we cannot)."""
        check_offer(offer_sdp)
        pc, session = self.pc, self.session

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if channel.label != "control":
                log.info("[%s] ignoring data channel %r", session.id, channel.label)
                return
            self.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                session.control.handle(message)

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                session.tasks.spawn(session.ingest.run(track), "ingest")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("[%s] connection %s", session.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                session.tasks.spawn(session.close(), "close")

        return await self._answer(offer_sdp, "sendrecv",
                                  lambda tr: shorten_audio_jitter_buffer(tr.receiver))


class ViewerPeer(_OutputPeer):
    """A WHEP viewer: its own peer connection that receives the session's video and voice.

    It takes nothing in (media a client sends anyway is not read, a data channel
    is not answered), and it leaves the session when its connection fails or
    closes; the session goes on.
    """

    def __init__(self, session: Session, config: RTCConfiguration,
                 video_codecs: Sequence[str] = ("H264", "VP8")) -> None:
        super().__init__(session, config, video_codecs)
        self.id = secrets.token_hex(8)

    async def answer(self, offer_sdp: str) -> str:
        """Apply the viewer's recvonly offer and return our SDP answer (``OfferError`` if we cannot)."""
        check_viewer_offer(offer_sdp)
        pc, session = self.pc, self.session

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("[%s] viewer %s connection %s", session.id, self.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                session.tasks.spawn(session.remove_viewer(self.id), f"viewer {self.id} gone")

        return await self._answer(offer_sdp, "sendonly")

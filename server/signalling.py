"""WebRTC signalling for one session: the SDP offer checked and answered, the peer wired up.

The peer carries one audio transceiver (the host's microphone up, the
avatar's voice down), one video transceiver (the avatar, sent only) and a
data channel named ``control``. The microphone goes to the session's ingest,
control messages to its control, and the session's outgoing tracks are sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.sdp import SessionDescription

from realtime.tracks import EncodedVideoTrack

if TYPE_CHECKING:
    from server.session import Session

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """The SDP offer cannot be answered (malformed, or missing what we need)."""


def check_offer(sdp: str) -> None:
    """Reject what is plainly not an offer we can answer, before aiortc sees it."""
    if "v=0" not in sdp or "m=" not in sdp:
        raise OfferError("body is not an SDP offer (expected 'v=0' and media sections)")
    kinds = [line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and line.split()]
    if "video" not in kinds:
        raise OfferError("the offer has no video section (add a recvonly video transceiver)")
    if "audio" not in kinds:
        raise OfferError("the offer has no audio section (add a sendrecv audio transceiver)")


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


class WebRTCPeer:
    """The session's peer connection."""

    def __init__(self, session: Session, config: RTCConfiguration,
                 video_codecs: Sequence[str] = ("H264", "VP8")) -> None:
        self.session = session
        self.video_codecs = tuple(video_codecs)
        self.pc = RTCPeerConnection(configuration=config)
        self.video: EncodedVideoTrack | None = None
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

        try:
            # codec choice only takes effect if set before the remote offer is applied
            video_tr = pc.addTransceiver("video", direction="sendonly")
            prefer_codecs(video_tr, self.video_codecs)
            self.video = EncodedVideoTrack(session.video_out)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            audio_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "audio" and not audio_set:
                    tr.sender.replaceTrack(session.audio)
                    tr.direction = "sendrecv"
                    shorten_audio_jitter_buffer(tr.receiver)
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
        if self.video is not None:
            self.video.stop()
        await self.pc.close()

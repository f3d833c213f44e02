"""WebRTC signalling for one session: the SDP offer checked and answered, the peer wired up.

The peer carries one audio transceiver (the host's microphone up, the
avatar's voice down), one video transceiver (the avatar, sent only) and a
data channel named ``control``. The microphone goes to the session's ingest,
control messages to its control, and the session's outgoing tracks are sent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

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


def prefer_codec(transceiver: RTCRtpTransceiver, name: str) -> None:
    caps = RTCRtpSender.getCapabilities("video")
    preferred = [c for c in caps.codecs if c.mimeType.lower() == f"video/{name.lower()}"]
    rest = [c for c in caps.codecs if c not in preferred]
    if preferred:
        transceiver.setCodecPreferences(preferred + [c for c in rest if c.mimeType.endswith("rtx")])


class WebRTCPeer:
    """The session's peer connection."""

    def __init__(self, session: Session, config: RTCConfiguration, video_codec: str = "VP8") -> None:
        self.session = session
        self.video_codec = video_codec
        self.pc = RTCPeerConnection(configuration=config)
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
            prefer_codec(video_tr, self.video_codec)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            audio_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "audio" and not audio_set:
                    tr.sender.replaceTrack(session.audio)
                    tr.direction = "sendrecv"
                    audio_set = True
            video_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "video" and tr.mid is not None and not video_set:
                    tr.sender.replaceTrack(session.video)
                    tr.direction = "sendonly"
                    video_set = True
            if not video_set:
                video_tr.sender.replaceTrack(session.video)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises many types on bad SDP
            raise OfferError(f"cannot answer the offer: {type(exc).__name__}: {exc}") from exc
        return str(pc.localDescription.sdp)

    async def close(self) -> None:
        await self.pc.close()

// The viewer (/viewer): watches a live session over WHEP, the video alone filling the window,
// as an OBS Browser Source shows it. /viewer?session=ID watches that session; /viewer follows the
// newest live session and re-attaches when it ends or a newer one starts. ?token=T is sent as
// "Authorization: Bearer T" for servers off loopback (the page is open, the API is not).
"use strict";

const params = new URLSearchParams(location.search);
const fixed = params.get("session");
const token = params.get("token") || "";
const POLL_MS = 2000;
const video = document.getElementById("video");
const note = document.getElementById("note");

// What tests (and curious hosts) can read: window.avatarViewer
const state = {
  sessionId: null, // the session being watched
  resource: null, // its WHEP viewer resource (DELETE ends it)
  connected: false,
  attaches: 0, // WHEP offers answered so far
  framesDecoded: 0,
  videoTime: 0,
  muted: false, // true while the browser holds the sound back until a click or key
  errors: [],
};
window.avatarViewer = state;

let pc = null;

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function errorOf(res) {
  try { return (await res.json()).error || `${res.status} ${res.statusText}`; } catch (e) { return `${res.status} ${res.statusText}`; }
}

function say(text) {
  note.textContent = text;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// The server does not trickle: the offer carries every candidate, so wait for gathering.
function waitForIce(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (peer.iceGatheringState === "complete") {
        peer.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000); // do not hang on a slow candidate
  });
}

// Sound on where the browser allows it (OBS does); else muted until the first click or key.
async function play() {
  if (state.muted) { // already held back: stay muted until the gesture, do not pause to ask again
    video.play().catch(() => { /* nothing more to try until a gesture */ });
    return;
  }
  video.muted = false;
  try {
    await video.play();
    state.muted = false;
  } catch (e) {
    if (e.name !== "NotAllowedError") return; // a newer source interrupted this play(): it plays
    video.muted = true;
    state.muted = true;
    say("click to unmute");
    video.play().catch(() => { /* nothing more to try until a gesture */ });
  }
}

function unmute() {
  if (!state.muted) return;
  video.muted = false;
  state.muted = false;
  if (note.textContent === "click to unmute") say("");
  video.play().catch(() => { /* the next gesture tries again */ });
}

async function attach(sid) {
  const peer = new RTCPeerConnection({ iceServers: [] });
  peer.addTransceiver("video", { direction: "recvonly" });
  peer.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  peer.ontrack = (ev) => {
    stream.addTrack(ev.track);
    if (video.srcObject !== stream) video.srcObject = stream;
    play();
  };
  peer.onconnectionstatechange = () => {
    if (peer !== pc) return;
    state.connected = peer.connectionState === "connected";
    if (state.connected && !state.muted) say("");
  };
  await peer.setLocalDescription(await peer.createOffer());
  await waitForIce(peer);
  const res = await fetch(`/v1/sessions/${encodeURIComponent(sid)}/whep`, {
    method: "POST",
    headers: headers({ "Content-Type": "application/sdp" }),
    body: peer.localDescription.sdp,
  });
  if (res.status !== 201) {
    peer.close();
    throw new Error(`session ${sid}: ${await errorOf(res)}`);
  }
  pc = peer;
  state.resource = res.headers.get("Location");
  state.sessionId = sid;
  state.attaches += 1;
  await peer.setRemoteDescription({ type: "answer", sdp: await res.text() });
}

function detach() {
  if (state.resource) {
    fetch(state.resource, { method: "DELETE", headers: headers(), keepalive: true }).catch(() => { /* gone */ });
  }
  if (pc) pc.close();
  pc = null;
  state.resource = null;
  state.sessionId = null;
  state.connected = false;
  video.srcObject = null;
}

// The session to watch now: the one asked for while it is live, else the newest live one.
async function target() {
  if (fixed) {
    const res = await fetch(`/v1/sessions/${encodeURIComponent(fixed)}`, { headers: headers() });
    if (res.ok) return fixed;
    if (res.status === 404 || res.status === 410) {
      say(`session ${fixed}: ${await errorOf(res)}`);
      return null;
    }
    throw new Error(await errorOf(res));
  }
  const res = await fetch("/v1/sessions", { headers: headers() });
  if (!res.ok) throw new Error(await errorOf(res));
  const sessions = (await res.json()).sessions;
  if (!sessions.length) {
    say("waiting for a live session");
    return null;
  }
  // a session placed a moment ago has no figures yet: it is the newest
  const started = (s) => (s.started_at == null ? Infinity : s.started_at);
  return sessions.reduce((a, b) => (started(b) > started(a) ? b : a)).session;
}

async function watch() {
  for (;;) {
    try {
      const sid = await target();
      const dead = pc && ["failed", "closed"].includes(pc.connectionState);
      if (sid !== state.sessionId || dead) {
        detach();
        if (sid) {
          say("connecting");
          await attach(sid);
        }
      }
    } catch (e) {
      state.errors.push(String(e.message || e));
      say(String(e.message || e));
    }
    await sleep(POLL_MS);
  }
}

function onFrame() {
  state.framesDecoded += 1;
  state.videoTime = video.currentTime;
  video.requestVideoFrameCallback(onFrame);
}

video.requestVideoFrameCallback(onFrame);
addEventListener("pointerdown", unmute);
addEventListener("keydown", unmute);
addEventListener("pagehide", detach);
watch();

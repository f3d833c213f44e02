// Host console: connects over WebRTC, sends the microphone and control
// messages, plays the avatar, and shows live figures. (The viewer, /viewer,
// is its own page: viewer.js.)
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// What tests (and curious hosts) can read: window.avatarClient
const state = {
  connected: false,
  framesDecoded: 0,
  receivedFps: 0,
  videoTime: 0,
  audioLevelDb: -120,
  audioPeakDb: -120,
  lastStats: null,
  errors: [],
  sessionUrl: null,
  viewerLink: null, // the running session's /viewer link (for OBS)
  characters: 1, // faces of the avatar the session (or the next Start) uses
  micCharacter: 0,
  answeredAt: null, // performance.now() when the SDP answer was applied
  firstFrameAt: null, // ... and when the first video frame was shown
  localStream: null, // the microphone as sent
  remoteStream: null, // the avatar as received
};
window.avatarClient = state;

let pc = null;
let dc = null;
let micStream = null;
let audioCtx = null;
let statsTimer = null;

function token() {
  return $("token").value.trim() || params.get("token") || localStorage.getItem("avatarToken") || "";
}

function headers(extra = {}) {
  const t = token();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

function showError(message) {
  state.errors.push(message);
  $("error").textContent = message;
}

function setStatus(text, cls = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${cls}`;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}

const avatarInfo = new Map();

async function loadAvatars(select) {
  try {
    const data = await (await api("/v1/avatars")).json();
    const sel = $("avatar");
    sel.innerHTML = "";
    avatarInfo.clear();
    for (const a of data.avatars) {
      avatarInfo.set(a.id, a);
      const opt = document.createElement("option");
      opt.value = a.id;
      const faces = a.faces > 1 ? `, ${a.faces} faces` : "";
      opt.textContent = `${a.id} (${a.width}x${a.height}${faces})`;
      sel.appendChild(opt);
    }
    sel.value = select || data.default;
    showPreview(sel.value);
    if (!pc) showCast(sel.value);
  } catch (e) {
    showError(`avatars: ${e.message}`);
  }
}

// The avatar preview: the photo through the frame the stream uses (the server's
// framing), mirrored, blurred and darkened where the frame reaches past the photo.
async function showPreview(id) {
  const info = avatarInfo.get(id);
  const canvas = $("avatar-preview");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  $("avatar-faces").textContent = "";
  if (!info || !info.framing) return;
  const f = info.framing;
  canvas.height = Math.round(canvas.width * f.out_h / f.out_w);
  try {
    const blob = await (await api(`/v1/avatars/${encodeURIComponent(id)}/image`)).blob();
    const img = await createImageBitmap(blob);
    const s = canvas.width / f.w;
    const draw = (flipX, flipY, dx, dy) => {
      ctx.save();
      ctx.translate((dx * info.width - f.x) * s, (dy * info.height - f.y) * s);
      ctx.scale(s * flipX, s * flipY);
      ctx.drawImage(img, flipX < 0 ? -info.width : 0, flipY < 0 ? -info.height : 0);
      ctx.restore();
    };
    if (f.outside > 0) {
      ctx.filter = "blur(6px) brightness(0.8) saturate(0.8)";
      for (const dx of [-1, 0, 1]) {
        for (const dy of [-1, 0, 1]) {
          if (dx || dy) draw(dx ? -1 : 1, dy ? -1 : 1, dx, dy);
        }
      }
      ctx.filter = "none";
    }
    draw(1, 1, 0, 0);
    ctx.strokeStyle = "rgba(255, 255, 255, 0.7)";
    ctx.fillStyle = "rgba(255, 255, 255, 0.9)";
    ctx.font = "11px sans-serif";
    (info.face_boxes || [info.face_box]).forEach((b, i) => {
      const x = (b.x - f.x) * s, y = (b.y - f.y) * s;
      ctx.strokeRect(x, y, b.w * s, b.h * s);
      if (info.faces > 1) ctx.fillText(String(i), x + 2, y + 11);
    });
    const filled = f.outside > 0.005 ? `, ${Math.round(100 * f.outside)}% filled past the photo` : "";
    $("avatar-faces").textContent = info.faces > 1
      ? `${info.faces} characters: 0 on the left, 1 on the right${filled}` : `one face${filled}`;
  } catch (e) {
    showError(`avatar preview: ${e.message}`);
  }
}

// Who speaks: with two faces the host picks the character the microphone and
// Say speak for (0 is the leftmost face).
function showCast(id) {
  const info = avatarInfo.get(id);
  state.characters = info ? Math.max(1, Math.min(2, info.faces)) : 1;
  $("cast").hidden = state.characters < 2;
  if (state.characters < 2) {
    $("mic-character").value = "0";
    $("say-character").value = "0";
  }
}

function routeMic() {
  state.micCharacter = Number($("mic-character").value);
  if (dc && dc.readyState === "open") send({ type: "mic", character: state.micCharacter });
}

function describeShot(sh) {
  const gestures = sh.gestures.map((g) => `${g.kind}@${g.at.toFixed(1)}s`).join(", ") || "none";
  return `shot: ${sh.start.toFixed(1)}-${sh.end.toFixed(1)}s\n` +
    `emotion: ${sh.emotion.label} (${sh.emotion.intensity.toFixed(2)})\n` +
    `gestures: ${gestures}\ngaze: ${sh.gaze}, head motion ${sh.head_motion.toFixed(2)}\n` +
    `negative: ${sh.negative_prompt || "-"}\nwhy: ${sh.rationale || "-"}`;
}

function waitForIce(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { peer.removeEventListener("icegatheringstatechange", done); resolve(); } };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000); // do not hang on a slow candidate
  });
}

function watchAudio(stream) {
  if (!stream.getAudioTracks().length) return;
  audioCtx = new AudioContext();
  const src = audioCtx.createMediaStreamSource(stream);
  const analyser = audioCtx.createAnalyser();
  analyser.fftSize = 2048;
  src.connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  const tick = () => {
    if (!audioCtx) return;
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const v of buf) sum += v * v;
    const db = 10 * Math.log10(sum / buf.length + 1e-12);
    state.audioLevelDb = db;
    state.audioPeakDb = Math.max(state.audioPeakDb, db);
    setTimeout(tick, 50);
  };
  tick();
}

function watchVideo(video) {
  let frames = 0;
  let t0 = performance.now();
  const onFrame = (now, meta) => {
    if (state.firstFrameAt === null) state.firstFrameAt = now;
    state.framesDecoded += 1;
    state.videoTime = video.currentTime;
    frames += 1;
    if (now - t0 >= 1000) {
      state.receivedFps = (frames * 1000) / (now - t0);
      $("fig-fps").textContent = state.receivedFps.toFixed(1);
      frames = 0;
      t0 = now;
    }
    if (pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function onStats(s) {
  state.lastStats = s;
  if (s.mic_character != null) state.micCharacter = s.mic_character;
  $("fig-latency").textContent = s.latency_ms == null
    ? `${s.pipeline_delay_ms} ms (delay)` : `${s.latency_ms.toFixed(0)} ms p95 (delay ${s.pipeline_delay_ms} ms)`;
  $("fig-av").textContent = `${s.av_offset_ms.toFixed(1)} ms`;
  $("fig-render").textContent = `${s.render_ms.toFixed(1)} ms / ${s.subclip_ms} ms sub-clip`;
  $("fig-held").textContent = `${s.held_frames} / ${s.late_frames}`;
  const shots = s.shots && s.shots.length > 1 ? s.shots : [s.shot];
  if (shots.some((sh) => sh)) {
    const fallbacks = s.director_fallbacks ? `, ${s.director_fallbacks} fallbacks` : "";
    const head = `director: ${s.director || "-"} (${s.instructions} instructions${fallbacks})`;
    const mic = shots.length > 1 ? `\nmicrophone speaks as ${s.mic_character}` : "";
    const parts = shots.map((sh, c) => {
      const who = shots.length > 1 ? `character ${c} (${c === 0 ? "left" : "right"})\n` : "";
      return who + (sh ? describeShot(sh) : "no plan yet");
    });
    $("shot").textContent = `${head}${mic}\n` + parts.join("\n\n");
  }
}

async function start() {
  $("start").disabled = true;
  state.answeredAt = null;
  state.firstFrameAt = null;
  $("error").textContent = "";
  setStatus("connecting");
  try {
    pc = new RTCPeerConnection({ iceServers: [] });
    if ($("mic").checked) {
      try {
        micStream = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        });
      } catch (e) {
        showError(`microphone unavailable (${e.message}); Say still works`);
      }
    }
    state.localStream = micStream;
    const micTrack = micStream ? micStream.getAudioTracks()[0] : null;
    if (micTrack) pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [micStream] });
    else pc.addTransceiver("audio", { direction: "sendrecv" });
    pc.addTransceiver("video", { direction: "recvonly" });
    dc = pc.createDataChannel("control");
    dc.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "stats") onStats(msg);
      else if (msg.type === "error") showError(msg.message);
    };
    dc.onopen = () => {
      for (const b of ["say", "instruct", "interrupt", "speech"]) $(b).disabled = false;
      if (state.characters > 1 && Number($("mic-character").value) !== 0) routeMic();
    };
    const remote = new MediaStream();
    state.remoteStream = remote;
    pc.ontrack = (ev) => {
      remote.addTrack(ev.track);
      const video = $("video");
      video.srcObject = remote;
      if (ev.track.kind === "audio") watchAudio(new MediaStream([ev.track]));
      if (ev.track.kind === "video") watchVideo(video);
      video.play().catch(() => { /* autoplay may wait for a gesture */ });
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected") { state.connected = true; setStatus("live", "live"); }
      if (["failed", "disconnected"].includes(pc.connectionState)) setStatus(pc.connectionState, "error");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const avatar = $("avatar").value;
    showCast(avatar);
    const res = await api(`/v1/sessions${avatar ? `?avatar=${encodeURIComponent(avatar)}` : ""}`, {
      method: "POST",
      headers: { "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    state.sessionUrl = res.headers.get("Location");
    showViewerLink(state.sessionUrl.split("/").pop());
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    state.answeredAt = performance.now();
    $("stop").disabled = false;
  } catch (e) {
    showError(`start failed: ${e.message}`);
    setStatus("error", "error");
    await stop();
  }
}

async function stop() {
  if (state.sessionUrl) {
    try { await api(state.sessionUrl, { method: "DELETE" }); } catch (e) { /* already gone */ }
  }
  state.sessionUrl = null;
  state.connected = false;
  showViewerLink(null);
  if (statsTimer) clearInterval(statsTimer);
  if (pc) pc.close();
  pc = null;
  dc = null;
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  micStream = null;
  if (audioCtx) audioCtx.close();
  audioCtx = null;
  for (const b of ["stop", "say", "instruct", "interrupt", "speech"]) $(b).disabled = true;
  $("start").disabled = false;
  setStatus("idle");
}

// The viewer link of the running session: the stream alone over WHEP, what a host pastes into
// OBS as a Browser Source (with the token, where the server needs one).
function showViewerLink(sid) {
  $("viewer-row").hidden = !sid;
  if (!sid) return;
  const link = new URL("/viewer", location.href);
  link.searchParams.set("session", sid);
  if (token()) link.searchParams.set("token", token());
  $("viewer-link").value = link.href;
  state.viewerLink = link.href;
}

async function copyViewerLink() {
  const input = $("viewer-link");
  try {
    await navigator.clipboard.writeText(input.value);
  } catch (e) { // no clipboard API off a secure origin: the old way
    input.select();
    document.execCommand("copy");
  }
  $("copy-viewer").textContent = "Copied";
  setTimeout(() => { $("copy-viewer").textContent = "Copy"; }, 1500);
}

function send(msg) {
  if (dc && dc.readyState === "open") dc.send(JSON.stringify(msg));
  else showError("not connected");
}

$("start").onclick = start;
$("copy-viewer").onclick = copyViewerLink;
$("mic-character").onchange = routeMic;
$("stop").onclick = stop;
$("interrupt").onclick = () => send({ type: "interrupt" });
$("say-form").onsubmit = (ev) => {
  ev.preventDefault();
  const text = $("say-text").value.trim();
  if (!text) return;
  const character = state.characters > 1 ? Number($("say-character").value) : 0;
  send(character ? { type: "say", text, character } : { type: "say", text });
};
$("instruct-form").onsubmit = (ev) => {
  ev.preventDefault();
  const text = $("instruct-text").value.trim();
  if (text) send({ type: "instruct", text });
};
$("speech-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const file = $("speech-file").files[0];
  if (!file || !state.sessionUrl) return;
  try {
    const res = await api(`${state.sessionUrl}/speech`, {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file,
    });
    const info = await res.json();
    $("error").textContent = `playing ${info.duration_s.toFixed(1)} s of audio`;
  } catch (e) {
    showError(`audio upload failed: ${e.message}`);
  }
};
$("avatar").onchange = () => { showPreview($("avatar").value); if (!pc) showCast($("avatar").value); };
$("token").onchange = () => { localStorage.setItem("avatarToken", $("token").value.trim()); loadAvatars(); };
$("upload-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const file = $("upload").files[0];
  if (!file) return;
  try {
    const res = await api("/v1/avatars", { method: "POST", headers: { "Content-Type": file.type }, body: file });
    const info = await res.json();
    await loadAvatars(info.id);
    $("error").textContent = `uploaded ${info.id}: used for the next Start`;
  } catch (e) {
    showError(`upload failed: ${e.message}`);
  }
};
loadAvatars();

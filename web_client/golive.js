// Go live: push the current session to a streaming platform over RTMP(S), as OBS does
// (a server URL and a stream key), and show each push's state. Uses app.js's api(),
// state and showError().
"use strict";

const goLive = { timer: null, egress: [] };
window.avatarGoLive = goLive; // what tests read

function egressLine(e) {
  const li = document.createElement("li");
  const what = e.state === "live"
    ? `live, ${Math.round(e.bitrate_kbps)} kbps`
    : e.state + (e.error ? `: ${e.error}` : "");
  const extra = [e.dropped_frames ? `${e.dropped_frames} dropped` : "",
    e.reconnects ? `${e.reconnects} reconnects` : ""].filter(Boolean).join(", ");
  li.textContent = `${e.url}: ${what}${extra ? ` (${extra})` : ""} `;
  li.className = `egress-${e.state}`;
  li.dataset.state = e.state;
  const stopBtn = document.createElement("button");
  stopBtn.textContent = "Stop";
  stopBtn.onclick = async () => {
    try {
      await api(`${state.sessionUrl}/egress/${e.id}`, { method: "DELETE" });
    } catch (err) {
      showError(`stopping the stream failed: ${err.message}`);
    }
    refreshEgress();
  };
  li.appendChild(stopBtn);
  return li;
}

async function refreshEgress() {
  const list = $("egress-list");
  $("golive").disabled = !state.sessionUrl;
  if (!state.sessionUrl) {
    goLive.egress = [];
    list.replaceChildren();
    return;
  }
  try {
    const res = await api(`${state.sessionUrl}/egress`);
    goLive.egress = (await res.json()).egress;
    list.replaceChildren(...goLive.egress.map(egressLine));
  } catch (e) {
    /* the session is ending: Stop clears the list */
  }
}

$("golive-server").value = localStorage.getItem("avatarRtmpServer") || "";
$("golive-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const server = $("golive-server").value.trim();
  const key = $("golive-key").value.trim();
  if (!state.sessionUrl) return showError("press Start first: Go live streams the running session");
  if (!server || !key) return showError("Go live needs the platform's server URL and your stream key");
  try {
    await api(`${state.sessionUrl}/egress`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ server, key }),
    });
    localStorage.setItem("avatarRtmpServer", server); // the key is a secret: not kept
    $("error").textContent = "";
  } catch (e) {
    showError(`go live failed: ${e.message}`);
  }
  refreshEgress();
};
goLive.timer = setInterval(refreshEgress, 2000);

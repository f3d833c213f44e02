"""The director on the labelled cases of ``bench/director_cases.json``: accuracy and latency.

Each case's line is spoken by the packaged Piper voice and planned as Say
text (one window over the whole utterance, as the live loop plans Say text
ahead); an empty line is two seconds of silence. The main shot (the longest
speaking one, else the longest) is checked against the case's expectations.

Latency is measured separately, as the live loop sees it: each utterance is
planned in 2-second windows with the words known (Say); with ``--whisper``
also ahead of live audio (the microphone: words from a background Whisper
transcript of what was heard so far) and from audio alone once it has
arrived (an upload: Whisper runs inside the planning call).

    python -m bench.director_accuracy                  # embedded director
    python -m bench.director_accuracy --whisper        # also the transcript path
    python -m bench.director_accuracy --llm-url http://127.0.0.1:8000/v1 --llm-model gemma
    python -m bench.director_accuracy --local-llm      # starts llama.cpp's server with Gemma 270M
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import AUDIO_RATE
from engines.director.base import Director, PlanRequest
from engines.director.embedded import EmbeddedDirector
from engines.storyline import GestureKind, Shot, Window, shot_face

CASES = Path(__file__).with_name("director_cases.json")
WINDOW_S = 2.0


def load_cases(path: Path = CASES) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["cases"])


def speak(text: str) -> np.ndarray:
    """The line as 16 kHz speech from the packaged voice ('' gives 2 s of silence)."""
    if not text:
        return np.zeros(int(2.0 * AUDIO_RATE), np.float32)
    from realtime.tts import synthesize

    return np.concatenate([c.ana for c in synthesize(text)]).astype(np.float32)


def main_shot(window: Window) -> Shot:
    return max(window.shots, key=lambda s: (bool(s.gestures) or "talking to" in s.prompt, s.end - s.start))


def check(shot: Shot, shots: list[Shot], expect: dict[str, Any]) -> dict[str, bool]:
    """Which expectations hold for the main shot (gestures: over the whole window)."""
    kinds = {g.kind for s in shots for g in s.gestures}
    smile = shot_face(shot)[0]
    out: dict[str, bool] = {}
    if "emotion" in expect:
        out["emotion"] = shot.emotion.label.value in expect["emotion"]
    if "gestures_any" in expect:
        out["gestures"] = any(GestureKind(k) in kinds for k in expect["gestures_any"])
    if expect.get("gestures_none"):
        out["gestures"] = not kinds
    if "gestures_forbid" in expect:
        out["gestures"] = out.get("gestures", True) and not any(
            GestureKind(k) in kinds for k in expect["gestures_forbid"])
    if "head_motion_max" in expect:
        out["head_motion"] = shot.head_motion <= expect["head_motion_max"] + 1e-6
    if "head_motion_min" in expect:
        out["head_motion"] = out.get("head_motion", True) and shot.head_motion >= expect["head_motion_min"]
    if "smile" in expect:
        out["smile"] = smile > 0.05 if expect["smile"] == "up" else smile <= 0.05
    if "gaze" in expect:
        out["gaze"] = shot.gaze.value == expect["gaze"]
    if "negatives_any" in expect:
        out["negatives"] = any(t in shot.negative_prompt for t in expect["negatives_any"])
    return out


def request(case: dict[str, Any], audio: np.ndarray, start: float, end: float, *, say: bool,
            avatar: np.ndarray | None) -> PlanRequest:
    dur = len(audio) / AUDIO_RATE
    i0, i1 = round(start * AUDIO_RATE), round(end * AUDIO_RATE)
    window_audio = np.zeros(i1 - i0, np.float32)
    chunk = audio[i0:i1]
    window_audio[: len(chunk)] = chunk
    utter = [(0.0, dur, case["line"])] if say and case["line"] else []
    return PlanRequest(session_id="bench", start=start, end=end, audio=window_audio,
                       text=case["line"] if utter else None, utterances=utter,
                       instructions=list(case["instructions"]), avatar_image=avatar,
                       avatar_id="astronaut")


async def evaluate(director: Director, cases: list[dict[str, Any]], audios: dict[str, np.ndarray],
                   avatar: np.ndarray | None) -> dict[str, Any]:
    per_case: list[dict[str, Any]] = []
    by_field: dict[str, list[bool]] = defaultdict(list)
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for case in cases:
        audio = audios[case["id"]]
        end = max(round(len(audio) / AUDIO_RATE + 0.3, 2), WINDOW_S)
        window = await director.plan_window(request(case, audio, 0.0, end, say=True, avatar=avatar))
        shot = main_shot(window)
        result = check(shot, window.shots, case["expect"])
        ok = all(result.values())
        for k, v in result.items():
            by_field[k].append(v)
        by_cat[case["category"]].append(ok)
        per_case.append({"id": case["id"], "ok": ok, "checks": result,
                         "emotion": f"{shot.emotion.label.value} {shot.emotion.intensity:.2f}",
                         "gestures": [g.kind.value for s in window.shots for g in s.gestures],
                         "head_motion": shot.head_motion, "gaze": shot.gaze.value,
                         "smile": round(shot_face(shot)[0], 2), "rationale": shot.rationale})
    n_ok = sum(c["ok"] for c in per_case)
    return {
        "cases": len(per_case), "correct": n_ok, "accuracy": n_ok / max(len(per_case), 1),
        "by_field": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_field.items())},
        "by_category": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_cat.items())},
        "details": per_case,
    }


async def latency(director: Director, cases: list[dict[str, Any]], audios: dict[str, np.ndarray],
                  avatar: np.ndarray | None, *, mode: str) -> list[float]:
    """Milliseconds per 2-second window, planning each utterance window by window.

    ``say``: the words are known; ``audio``: the window's audio has arrived, no
    words (transcribed in the call); ``live``: planned ahead of live audio, from
    the audio heard so far (transcribed in the background).
    """
    ms: list[float] = []
    for case in cases:
        audio = audios[case["id"]]
        dur = len(audio) / AUDIO_RATE
        t = 0.0
        while t < dur:
            req = request(case, audio, t, t + WINDOW_S, say=mode == "say", avatar=avatar)
            if mode == "live":
                heard = audio[: round(t * AUDIO_RATE)]
                req = PlanRequest(session_id="bench", start=t + WINDOW_S, end=t + 2 * WINDOW_S,
                                  recent_audio=heard[-3 * AUDIO_RATE:],
                                  recent_start=max(0.0, t - 3.0), avatar_image=avatar,
                                  avatar_id="astronaut")
            t0 = time.perf_counter()
            await director.plan_window(req)
            ms.append((time.perf_counter() - t0) * 1000)
            t += WINDOW_S
    return ms


def summary_ms(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {}
    return {"windows": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(max(ms), 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from skimage import data

    cases = load_cases()
    avatar = np.ascontiguousarray(data.astronaut())
    t0 = time.perf_counter()
    audios = {c["id"]: speak(c["line"]) for c in cases}
    logging.info("spoke %d lines in %.1f s", len(cases), time.perf_counter() - t0)
    director: Director
    if args.llm_url:
        from engines.director.llm import LLMConfig, LLMDirector

        director = LLMDirector(LLMConfig(base_url=args.llm_url, model=args.llm_model,
                                         timeout_s=args.llm_timeout, request_timeout_s=args.llm_timeout))
    else:
        director = EmbeddedDirector()
    try:
        # warm-up: models load once per process
        await director.plan_window(request(cases[0], audios[cases[0]["id"]], 0.0, WINDOW_S, say=True,
                                           avatar=avatar))
        subset = cases if not args.llm_url else cases[: args.llm_cases]
        out: dict[str, Any] = {"director": director.name}
        out["accuracy"] = await evaluate(director, subset, audios, avatar)
        out["latency_say"] = summary_ms(await latency(director, subset, audios, avatar, mode="say"))
        if args.whisper and not args.llm_url:
            spoken = [c for c in cases if c["line"] and c["category"] in ("plain", "negation", "gesture")]
            out["latency_live"] = summary_ms(await latency(director, spoken, audios, avatar, mode="live"))
            out["latency_audio"] = summary_ms(await latency(director, spoken, audios, avatar, mode="audio"))
        if args.llm_url:
            from engines.director.llm import LLMDirector

            assert isinstance(director, LLMDirector)
            st = director.stats
            out["llm"] = {"windows": st.windows, "fallbacks": st.fallbacks, "requests": st.requests,
                          "repairs": st.repairs, "last_error": st.last_error,
                          "exchange_ms": summary_ms(st.window_ms)}
        return out
    finally:
        await director.aclose()


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # as the server runs the director's models (avatar serve --cpu-threads 1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--whisper", action="store_true", help="also time the transcript (microphone) path")
    p.add_argument("--llm-url", help="OpenAI-compatible base URL (…/v1): measure the LLM director")
    p.add_argument("--llm-model", default="local")
    p.add_argument("--llm-timeout", type=float, default=60.0)
    p.add_argument("--llm-cases", type=int, default=10, help="cases to run through the LLM")
    p.add_argument("--local-llm", action="store_true",
                   help="start llama_cpp.server with the packaged Gemma 3 270M and measure against it")
    p.add_argument("--llm-threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--failures", action="store_true", help="print the cases that fail")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.local_llm:
        import tempfile

        from server.launch import LocalLLMProcess

        with tempfile.TemporaryDirectory() as tmp, \
                LocalLLMProcess(Path(tmp), threads=args.llm_threads) as llm:
            args.llm_url, args.llm_model = llm.base_url, llm.model
            out = asyncio.run(run(args))
    else:
        out = asyncio.run(run(args))
    acc = out["accuracy"]
    print(f"director: {out['director']}")
    print(f"accuracy: {acc['correct']}/{acc['cases']} = {acc['accuracy']:.1%}")
    print(f"by field: {acc['by_field']}")
    print(f"by category: {acc['by_category']}")
    for key in ("latency_say", "latency_live", "latency_audio"):
        if key in out:
            print(f"{key}: {out[key]}")
    if "llm" in out:
        print(f"llm: {out['llm']}")
    if args.failures:
        for c in acc["details"]:
            if not c["ok"]:
                print(f"  FAIL {c['id']}: {c['checks']} emotion={c['emotion']} gestures={c['gestures']} "
                      f"head={c['head_motion']:.2f} smile={c['smile']} gaze={c['gaze']}")
                print(f"      {c['rationale']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

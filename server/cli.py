"""The ``avatar`` command: ``avatar serve ...``, ``avatar render ...`` (offline, to an MP4 file),
and ``avatar trt ...`` for engine builds."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("avatar")


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine options ``serve`` and ``render`` share (the video size is each one's own)."""
    p.add_argument("--engine", default="portrait", choices=["portrait", "dit", "flashhead"])
    p.add_argument("--weights", type=Path,
                   help="dit: local checkpoint folder; flashhead: the published "
                        "SoulX-FlashHead-1_3B folder")
    p.add_argument("--wav2vec", type=Path,
                   help="flashhead: the published facebook/wav2vec2-base-960h folder")
    p.add_argument("--model", default="pro", choices=["pro", "lite"],
                   help="flashhead: Model_Pro (quality) or Model_Lite (speed)")
    p.add_argument("--random-weights", action="store_true",
                   help="dit, flashhead: random weights, for throughput tests only")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--dit-backend", default="auto", choices=["auto", "tensorrt", "compile", "eager"],
                   help="dit, flashhead: per network a TensorRT engine, else torch.compile (GPU), "
                        "else eager (auto)")
    p.add_argument("--trt-engines", type=Path,
                   help="dit, flashhead: TensorRT engine folder (avatar trt build)")


def _director_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--director", default="embedded", choices=["embedded", "llm", "static"],
                   help="who plans the storyline: embedded analysers (default), an LLM, or static")
    p.add_argument("--llm-url", help="llm director: OpenAI-compatible base URL, e.g. http://HOST:8000/v1")
    p.add_argument("--llm-model", default="local", help="llm director: model name")
    p.add_argument("--llm-key", default=os.environ.get("AVATAR_LLM_KEY"),
                   help="llm director: API key (or AVATAR_LLM_KEY)")
    p.add_argument("--llm-timeout", type=float, default=8.0,
                   help="llm director: seconds per window before the embedded director takes over")
    p.add_argument("--llm-rounds", type=int, default=2, help="llm director: rounds of expert exchange")


def _director_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"llm_url": args.llm_url, "llm_model": args.llm_model, "llm_key": args.llm_key,
            "llm_timeout_s": args.llm_timeout, "llm_rounds": args.llm_rounds}


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="start the avatar server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--avatar", type=Path, help="portrait photo (JPEG/PNG) used by default")
    p.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="gather ICE host candidates only on ADDR (repeatable)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server URL (none by default)")
    p.add_argument("--max-sessions", type=int, default=4)
    p.add_argument("--max-viewers", type=int, default=10, metavar="N",
                   help="WHEP viewers per session (POST /v1/sessions/{id}/whep); 0 turns them off")
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                   help="bearer token (required off loopback; generated if not given)")
    p.add_argument("--delay-ms", type=float, default=None,
                   help="playout delay: video latency, the voice is delayed to match (default: set "
                        "from the sub-clip length and the engine's render time, measured at start)")
    p.add_argument("--subclip-frames", type=int, default=1,
                   help="frames per sub-clip: the latency knob (audio waited for before a render)")
    p.add_argument("--workers", type=int, default=1, help="parallel sub-clips per session")
    p.add_argument("--video-codecs", default="H264,VP8", metavar="LIST",
                   help="video codecs to send, preferred first, from what the peer offers (H264, VP8)")
    p.add_argument("--session-workers", type=int, default=0, metavar="N",
                   help="session worker processes (default: one per core; one for GPU engines)")
    p.add_argument("--render-threads", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="PyTorch CPU threads (the director's models; renders run on their own threads)")
    _director_arguments(p)
    _engine_arguments(p)
    p.add_argument("--flashhead-size", default="512x512", metavar="WxH",
                   help="flashhead: video size (512x512 as trained; smaller for tiny test checkpoints)")
    p.add_argument("--consent-interval", type=float, default=2.0,
                   help="seconds between ICE consent checks")
    p.add_argument("--consent-failures", type=int, default=5,
                   help="missed consent checks before a peer counts as gone")
    p.add_argument("--log-level", default="INFO")


def _engine_options(args: argparse.Namespace, size: str | None) -> dict[str, Any]:
    """What ``create_engine`` takes besides the name, as JSON for the session workers."""
    return {"weights": str(args.weights) if args.weights else None, "random_weights": args.random_weights,
            "device": args.device, "dtype": args.dtype, "dit_backend": args.dit_backend,
            "trt_engines": str(args.trt_engines) if args.trt_engines else None,
            "wav2vec": str(args.wav2vec) if args.wav2vec else None, "model": args.model, "size": size}


def serve(args: argparse.Namespace) -> int:
    from server.app import AvatarServer, ServerConfig
    from server.directors import director_factory
    from server.host import HostConfig
    from server.workers import WorkerError

    if args.cpu_threads < 1:
        log.error("--cpu-threads must be at least 1, got %d", args.cpu_threads)
        return 2
    if args.max_viewers < 0:
        log.error("--max-viewers must be 0 or more, got %d", args.max_viewers)
        return 2
    director_options = _director_options(args)
    try:
        director_factory(args.director, **director_options)  # its settings are checked here, once
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    gpu_engine = args.engine != "portrait"
    workers = args.session_workers or (1 if gpu_engine else max(1, os.cpu_count() or 1))
    host = HostConfig(
        engine=args.engine,
        # the portrait engine streams at its own size; --flashhead-size is the flashhead engine's
        engine_options=_engine_options(args, args.flashhead_size if args.engine == "flashhead" else None),
        director=args.director,
        director_options=director_options, data_dir=args.data_dir, ice_hosts=args.ice_host,
        ice_servers=args.ice_server, consent_interval_s=args.consent_interval,
        consent_failures=args.consent_failures, delay_ms=args.delay_ms,
        subclip_frames=args.subclip_frames, workers=args.workers, render_threads=args.render_threads,
        cpu_threads=args.cpu_threads,
        # live transcripts for the director share a quarter of one core, whatever the worker count
        live_transcription_duty=0.25 / workers,
        video_codecs=[c.strip().upper() for c in args.video_codecs.split(",")], max_viewers=args.max_viewers,
        director_timeout_s=args.llm_timeout + 2.0 if args.director == "llm" else 1.5,
    )
    config = ServerConfig(
        host=args.host, port=args.port, avatar=args.avatar, max_sessions=args.max_sessions,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), data_dir=args.data_dir,
        token=args.token, session_workers=workers,
    )
    server = AvatarServer(config, host, log_level=args.log_level)
    if config.token and config.requires_token():
        sys.stderr.write(f"API token: {config.token}\n")
    from aiohttp import web

    log.info("serving on http://%s:%d (engine %s, %d session worker(s))", args.host, args.port,
             args.engine, workers)
    try:
        web.run_app(server.build_app(), host=args.host, port=args.port, print=None, access_log=None)
    except WorkerError as exc:
        log.error("%s", exc)
        return 2
    return 0


def _render_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("render", help="render a talking portrait to an MP4 file, offline",
                       description="Render a portrait speaking a text or an audio file to an MP4 (H.264 + "
                                   "AAC, 25 fps), through the pipeline a live session runs.")
    p.add_argument("--avatar", type=Path, required=True, metavar="IMG",
                   help="portrait photo (JPEG/PNG) with one or two clear faces")
    p.add_argument("--audio", type=Path, metavar="FILE", help="speech to say: WAV, MP3, OGG, FLAC, ...")
    p.add_argument("--text", help="text to say (Piper, the packaged voice)")
    p.add_argument("--instruct", action="append", default=[], metavar="TEXT",
                   help="a standing instruction for the director, e.g. 'be cheerful' (repeatable)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.mp4", help="the MP4 file to write")
    p.add_argument("--size", default="512x512", metavar="WxH",
                   help="video size (portrait: multiples of 128; flashhead: 512x512 as trained)")
    _engine_arguments(p)
    _director_arguments(p)
    p.add_argument("--subclip-frames", type=int, default=1, help="frames per sub-clip, as live")
    p.add_argument("--tail", type=float, default=0.5, metavar="S", help="seconds after the speech ends")
    p.add_argument("--crf", type=int, default=20, help="H.264 constant quality (lower: better, larger)")
    p.add_argument("--preset", default="medium", help="libx264 preset (ultrafast ... veryslow)")
    p.add_argument("--cpu-threads", type=int, default=1, help="PyTorch CPU threads (the director's models)")
    p.add_argument("--log-level", default="WARNING")


def render(args: argparse.Namespace) -> int:
    """``avatar render``: exit 0 with the file written, 2 with one line saying what was wrong."""
    import asyncio

    from server.render import (
        DIRECTOR_TIMEOUT_S,
        OutputFile,
        Progress,
        RenderError,
        SpeechFeed,
        TextSpeech,
        check_instruction,
        load_audio,
        load_portrait,
        render_file,
    )

    # the models' loading bars (Hugging Face) would break the render's own progress line
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def fail(message: str) -> int:
        sys.stderr.write(f"avatar render: {message}\n")
        return 2

    if (args.audio is None) == (args.text is None):
        return fail("give the speech as either --audio FILE or --text TEXT" +
                    (", not both" if args.audio is not None else ""))
    if args.subclip_frames < 1 or args.cpu_threads < 1 or args.tail < 0:
        return fail("--subclip-frames and --cpu-threads must be at least 1, --tail at least 0")
    try:
        # what the user gave is checked before any model loads: a mistake costs a second
        out = OutputFile(args.out)
    except RenderError as exc:
        return fail(str(exc))
    try:
        speech: SpeechFeed = load_audio(args.audio) if args.audio is not None else TextSpeech(args.text)
        for text in args.instruct:
            check_instruction(text)
        image = load_portrait(args.avatar)
        from server.directors import director_factory

        try:
            make_director = director_factory(args.director, **_director_options(args))
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        import cv2
        import torch

        from engines.registry import create_engine

        cv2.setNumThreads(1)  # the renders take one core, the video encoder the others
        torch.set_num_threads(args.cpu_threads)
        try:
            engine = create_engine(args.engine, **_engine_options(args, args.size))
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        result = asyncio.run(render_file(
            engine, image, make_director(), speech, out.temp, instructions=args.instruct,
            subclip_frames=args.subclip_frames, tail_s=args.tail, crf=args.crf, preset=args.preset,
            director_timeout_s=max(DIRECTOR_TIMEOUT_S, args.llm_timeout + 2.0), progress=Progress()))
        out.commit()
    except RenderError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written")
        return 130
    finally:
        out.discard()
    w, h = result.size
    sys.stderr.write(f"wrote {args.out}: {result.duration_s:.2f} s, {result.frames} frames {w}x{h} at "
                     f"{result.fps} fps (H.264 + AAC), rendered in {result.wall_s:.1f} s: "
                     f"{result.speed:.1f}x real time\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatar", description="live avatar server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _render_parser(sub)
    sub.add_parser("trt", help="export, check, build, inspect and bench DiT engines",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "trt":
        from trt_build.cli import main as trt_main

        return int(trt_main(argv[1:]) or 0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # a line per transcript
    return render(args) if args.command == "render" else serve(args)


if __name__ == "__main__":
    sys.exit(main())

"""Headless Chromium (Debian's) with a fake microphone: the host console as a user uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.peer import RATE
from tests.conftest import RunningServer
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, FAKE_MIC_ARGS, NO_CHROMIUM, speech, wav_bytes

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM),
]


async def test_host_console_in_chromium(server: RunningServer, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    mic = tmp_path / "mic.wav"  # a line of speech, then a long silence (Chromium loops it)
    mic.write_bytes(wav_bytes(np.concatenate([speech("Hi, I am testing the microphone.", rate=RATE),
                                              np.zeros(RATE * 10, np.float32)]), RATE))
    args = [*CHROMIUM_ARGS, *FAKE_MIC_ARGS, f"--use-file-for-fake-audio-capture={mic}"]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.url)
            await page.wait_for_function("document.querySelector('#avatar').options.length > 0")
            await page.click("#start")
            await page.wait_for_function(
                "window.avatarClient.connected && window.avatarClient.framesDecoded > 25",
                timeout=30_000)
            # the viewer link for OBS: this session's /viewer
            sid = (await page.evaluate("window.avatarClient.sessionUrl")).rsplit("/", 1)[1]
            assert await page.is_visible("#viewer-link")
            assert await page.input_value("#viewer-link") == f"{server.url}/viewer?session={sid}"
            t1 = await page.evaluate("window.avatarClient.videoTime")
            await page.wait_for_function(f"window.avatarClient.videoTime > {t1} + 1.0",
                                         timeout=5_000)  # the video plays, time advances
            # live figures are on the page
            await page.wait_for_function(
                "document.querySelector('#fig-fps').textContent !== '–' && "
                "document.querySelector('#fig-av').textContent !== '–'", timeout=10_000)
            # wait for the microphone's silent stretch, then Say
            await page.wait_for_function("window.avatarClient.audioLevelDb < -50", timeout=15_000)
            await page.fill("#say-text", "Hello from the browser test, can you hear me?")
            await page.click("#say")
            await page.wait_for_function("window.avatarClient.audioLevelDb > -35", timeout=8_000)
            fps = await page.evaluate("window.avatarClient.receivedFps")
            assert fps > 15, f"received {fps:.1f} fps in the browser"
            # an instruction: the director's view on the page shows the new plan
            await page.fill("#instruct-text", "be cheerful and nod when you agree")
            await page.click("#instruct")
            await page.wait_for_function(
                "document.querySelector('#shot').textContent.includes('emotion: happy')", timeout=8_000)
            shot_view = await page.text_content("#shot")
            assert shot_view is not None and "director: embedded" in shot_view and "negative:" in shot_view
            await page.screenshot(path=str(tmp_path / "console.png"))
            await page.click("#interrupt")
            await page.wait_for_function("window.avatarClient.audioLevelDb < -50", timeout=5_000)
            await page.click("#stop")
            await page.wait_for_function("!window.avatarClient.connected", timeout=5_000)
            assert errors == [], errors
            assert await page.evaluate("window.avatarClient.errors") == []
        finally:
            await browser.close()


async def test_host_console_picks_who_speaks_on_a_two_person_avatar(server: RunningServer,
                                                                     tmp_path: Path) -> None:
    import io

    import aiohttp
    from PIL import Image
    from playwright.async_api import async_playwright

    from tests.portraits import two_closed_mouths

    buf = io.BytesIO()
    Image.fromarray(two_closed_mouths()).save(buf, format="JPEG", quality=92)
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.url}/v1/avatars", data=buf.getvalue(),
            headers={"Content-Type": "image/jpeg"}) as res:
        assert res.status == 201, await res.text()
        avatar = (await res.json())["id"]
    args = [*CHROMIUM_ARGS, *FAKE_MIC_ARGS]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.url)
            await page.wait_for_function(
                f"[...document.querySelector('#avatar').options].some(o => o.value === '{avatar}')")
            assert await page.is_hidden("#cast"), "one face: nobody to pick"
            await page.select_option("#avatar", avatar)
            await page.wait_for_selector("#cast", state="visible")
            await page.select_option("#mic-character", "1")  # before Start: sent once connected
            await page.select_option("#say-character", "1")
            await page.click("#start")
            await page.wait_for_function(
                "window.avatarClient.connected && window.avatarClient.lastStats && "
                "window.avatarClient.lastStats.mic_character === 1", timeout=30_000)
            await page.fill("#say-text", "Hello from the one on the right.")
            await page.click("#say")
            await page.wait_for_function("window.avatarClient.audioLevelDb > -35", timeout=8_000)
            await page.wait_for_function(
                "document.querySelector('#shot').textContent.includes('character 1 (right)') && "
                "document.querySelector('#shot').textContent.includes('listening to character 1')",
                timeout=8_000)
            panel = await page.text_content("#shot")
            assert panel is not None and "character 0 (left)" in panel
            assert "microphone speaks as 1" in panel
            await page.select_option("#mic-character", "0")
            await page.wait_for_function("window.avatarClient.lastStats.mic_character === 0",
                                         timeout=5_000)
            await page.screenshot(path=str(tmp_path / "two.png"))
            await page.click("#stop")
            assert errors == [], errors
            assert await page.evaluate("window.avatarClient.errors") == []
        finally:
            await browser.close()

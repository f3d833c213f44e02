"""Off loopback, the API needs a bearer token; the health check and the page do not."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from server.app import ServerConfig
from server.launch import ServerProcess

pytestmark = pytest.mark.slow


def test_token_is_required_only_off_loopback() -> None:
    assert not ServerConfig(host="127.0.0.1").requires_token()
    assert not ServerConfig(host="::1").requires_token()
    assert not ServerConfig(host="localhost").requires_token()
    assert ServerConfig(host="0.0.0.0").requires_token()
    assert ServerConfig(host="192.0.2.10").requires_token()


async def test_generated_token_guards_the_api(tmp_path: Path) -> None:
    # bound to every interface (the test only ever talks to 127.0.0.1)
    with ServerProcess(tmp_path, "--host", "0.0.0.0") as srv:
        match = re.search(r"API token: (\S+)", srv.tail(100_000))  # printed before ready
        assert match, "the generated token is printed once at start"
        token = match.group(1)
        assert srv.tail(100_000).count(token) <= 2  # printed, not logged on every request
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/healthz") as res:
                assert res.status == 200
            async with http.get(f"{srv.url}/") as res:
                assert res.status == 200 and "Live avatar" in await res.text()
            async with http.get(f"{srv.url}/v1/avatars") as res:
                assert res.status == 401
                assert "bearer" in (await res.json())["error"].lower()
            async with http.get(f"{srv.url}/v1/avatars",
                                headers={"Authorization": "Bearer wrong"}) as res:
                assert res.status == 401
            async with http.get(f"{srv.url}/v1/avatars",
                                headers={"Authorization": f"Bearer {token}"}) as res:
                assert res.status == 200
            async with http.post(f"{srv.url}/v1/sessions", data=b"v=0",
                                 headers={"Content-Type": "application/sdp"}) as res:
                assert res.status == 401

"""The avatars API's record of faces and framing (the store, without a server)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.base import Avatar
from engines.portrait import PortraitEngine
from server.avatars import AvatarError, AvatarStore
from tests.helpers import astronaut
from tests.portraits import hopper, hopper_3x4, side_by_side, two_people


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


async def test_store_reports_faces_boxes_and_the_streams_framing(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    one = await store.add(png(hopper_3x4()))
    assert one.faces == 1 and one.face_boxes is not None and len(one.face_boxes) == 1
    assert one.framing is not None and one.framing["outside"] > 0.05  # past both sides
    prep = PortraitEngine().prepare(Avatar(one.id, hopper_3x4()))
    for key in ("x", "y", "w", "h"):  # the frame the stream uses
        assert one.framing[key] == pytest.approx(getattr(prep.framing, key), abs=0.1)
    two = await store.add(png(two_people()))
    assert two.faces == 2 and two.face_boxes is not None
    assert two.face_boxes[0]["x"] < two.face_boxes[1]["x"]  # character 0 on the left
    assert store.info(two.id).as_dict()["face_boxes"] == two.face_boxes


async def test_more_than_two_faces_get_a_422_with_the_count(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path)
    three = side_by_side(astronaut(), hopper(), astronaut()[:, ::-1])
    with pytest.raises(AvatarError) as err:
        await store.add(png(three))
    assert err.value.status == 422
    assert "found 3 faces" in err.value.message and "at most 2" in err.value.message
    assert [a.id for a in store.list()] == []  # nothing stored

"""Export specs and profiles of the DiT networks: shapes, validation, call mapping (tiny preset, CPU)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from engines.dit.loading import DitComponents, random_components
from engines.dit.model import AudioCondition
from engines.dit.tensorrt.spec import (
    Profile,
    ProfileError,
    SubclipSpec,
    load_profiles,
    parse_stages,
    save_profiles,
    serving_profiles,
    stage_spec,
    static_groups,
)


@pytest.fixture(scope="module")
def tiny() -> DitComponents:
    return random_components("tiny", dtype=torch.float32, device="cpu")


def by_name(profiles: list[Profile]) -> dict[tuple[str, str], Profile]:
    return {(p.stage, p.name): p for p in profiles}


def test_serving_profiles_follow_what_the_server_renders(tiny: DitComponents) -> None:
    # tiny: 64x64 keyframes (8x8 latent), 128x128 output, 25 fps, 8 text tokens, no CFG
    got = by_name(serving_profiles(tiny, subclip_frames=[2, 8], characters=2))
    k = max(2, math.ceil(25 / 2))  # keyframes per batch: the scheduler's one second ahead
    blue = got[("blueprint", "64x64")].axes
    assert blue["frames"] == (2, 1 + k, 1 + k) and blue["height"] == (8, 8, 8) and blue["batch"] == (1, 1, 1)
    assert blue["text"] == (8, 8, k * 8)  # distinct prompts joined
    sub = got[("subclip", "64x64-n2-8")].axes
    assert sub["frames"] == (2, 2, 3)  # 2 frames -> 1 + ceil(2/4) latent frames; 8 -> 3
    assert sub["chars"] == (1, 1, 2)
    sr = got[("sr", "128x128-n2-8")].axes
    assert sr["height"] == (16, 16, 16) and sr["frames"] == (2, 2, 3)
    # the VAE decoder: keyframes as one-frame clips, sub-clips and SR clips per latent frame count
    assert got[("vae_decoder", "64x64-keyframes")].axes["batch"] == (1, k, k)
    assert {n for s, n in got if s == "vae_decoder"} == {
        "64x64-keyframes",
        "64x64-f2",
        "64x64-f3",
        "128x128-f2",
        "128x128-f3",
    }
    cfg = by_name(serving_profiles(tiny, cfg=True))
    assert cfg[("subclip", "64x64-n2")].axes["batch"] == (1, 1, 2)
    with pytest.raises(ValueError, match="multiples of 16"):
        serving_profiles(tiny, sizes=[(100, 64)])


def test_every_serving_profile_fits_its_spec(tiny: DitComponents) -> None:
    profiles = serving_profiles(tiny, sizes=[(64, 64), (96, 64)], subclip_frames=[2, 4, 8])
    for stage in parse_stages(None, tiny):
        spec = stage_spec(stage, tiny)
        mine = [p for p in profiles if p.stage == stage]
        assert mine
        for p in mine:
            spec.validate(p)
    vae = stage_spec("vae_decoder", tiny)
    groups = static_groups(vae, [p for p in profiles if p.stage == "vae_decoder"])
    assert sorted(groups) == [(("frames", 1),), (("frames", 2),), (("frames", 3),)]


def test_shapes_per_input_scale_with_the_axes(tiny: DitComponents) -> None:
    spec = stage_spec("subclip", tiny)
    assert spec.input_names == [
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "audio_tokens",
        "audio_gates",
    ]
    assert spec.outputs == ("sample", "mask_logits")
    profile = Profile(
        "subclip",
        "p",
        {
            "batch": (1, 1, 2),
            "frames": (2, 3, 5),
            "height": (8, 8, 16),
            "width": (8, 12, 16),
            "text": (8, 8, 16),
            "chars": (1, 1, 2),
        },
    )
    shapes = spec.shapes(profile)
    assert shapes["hidden_states"] == ((1, 12, 2, 8, 8), (1, 12, 3, 8, 12), (2, 12, 5, 16, 16))
    assert shapes["audio_gates"][2] == (2, 2, 5, 8, 8)  # the patch grid: latent / 2
    assert shapes["audio_tokens"][1] == (1, 1, 3, 4, 16)  # window 4, width 16 are fixed
    assert shapes["timestep"] == ((1,), (1,), (2,))
    feed = spec.sample_inputs(profile.point("max"))
    assert spec.axes_of(feed) == profile.point("max")
    assert 0 <= float(feed["timestep"].min()) and float(feed["timestep"].max()) <= 1000
    assert 0 <= float(feed["audio_gates"].min()) and float(feed["audio_gates"].max()) <= 1
    feed["audio_gates"] = feed["audio_gates"][:, :, :4]
    with pytest.raises(ValueError, match="disagree on axis frames"):
        spec.axes_of(feed)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        (
            {"batch": (1, 1, 1), "frames": (2, 2, 2), "height": (8, 8, 8), "width": (8, 8, 8)},
            "missing \\['text'\\]",
        ),
        (
            {
                "batch": (1, 1, 1),
                "frames": (2, 2, 2),
                "height": (8, 8, 8),
                "width": (8, 8, 8),
                "text": (8, 8, 8),
                "chars": (1, 1, 1),
            },
            "unknown \\['chars'\\]",
        ),
        (
            {
                "batch": (1, 3, 2),
                "frames": (2, 2, 2),
                "height": (8, 8, 8),
                "width": (8, 8, 8),
                "text": (8, 8, 8),
            },
            "min <= opt <= max",
        ),
        (
            {
                "batch": (1, 1, 1),
                "frames": (2, 2, 2),
                "height": (8, 8, 9),
                "width": (8, 8, 8),
                "text": (8, 8, 8),
            },
            "not a multiple of 2",
        ),
        (
            {
                "batch": (1, 1, 1),
                "frames": (2, 2, 2),
                "height": (8, 8, 8),
                "width": (8, 8, 4096),
                "text": (8, 8, 8),
            },
            "outside",
        ),
    ],
)
def test_profiles_that_do_not_fit_are_refused_with_the_reason(
    tiny: DitComponents, axes: dict[str, tuple[int, int, int]], message: str
) -> None:
    with pytest.raises(ProfileError, match=message):
        stage_spec("blueprint", tiny).validate(Profile("blueprint", "bad", axes))


def test_the_vae_decoder_frame_count_is_fixed_per_export(tiny: DitComponents) -> None:
    spec = stage_spec("vae_decoder", tiny)
    bad = Profile(
        "vae_decoder", "v", {"batch": (1, 1, 1), "frames": (1, 2, 3), "height": (8,) * 3, "width": (8,) * 3}
    )
    with pytest.raises(ProfileError, match="fixed per export"):
        spec.validate(bad)


def test_profile_files_round_trip_and_errors_name_the_problem(
    tiny: DitComponents, tmp_path: pathlib.Path
) -> None:
    profiles = serving_profiles(tiny)
    path = tmp_path / "profiles.json"
    save_profiles(profiles, path)
    assert load_profiles(path) == profiles
    with pytest.raises(ProfileError, match="avatar trt profile"):
        load_profiles(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profiles(path)
    path.write_text(json.dumps({"profiles": [{"stage": "unet", "axes": {}}]}))
    with pytest.raises(ProfileError, match="unknown stage 'unet'"):
        load_profiles(path)
    path.write_text(json.dumps({"profiles": [{"stage": "sr", "axes": {"batch": [1, 2]}}]}))
    with pytest.raises(ProfileError, match="\\[min, opt, max\\]"):
        load_profiles(path)
    one = {"stage": "sr", "name": "a", "axes": {"batch": 1}}
    path.write_text(json.dumps({"profiles": [one, one]}))
    with pytest.raises(ProfileError, match="two sr profiles are named 'a'"):
        load_profiles(path)


def test_a_dit_call_maps_to_named_inputs_and_back(tiny: DitComponents) -> None:
    spec = stage_spec("subclip", tiny)
    assert isinstance(spec, SubclipSpec)
    x = torch.randn(2, 12, 3, 8, 8)
    t, text = torch.full((2,), 500.0), torch.randn(2, 8, 16)
    probe = spec.feed(x, t, text)  # the mask probe runs without audio: zero gates leave audio out
    assert probe["audio_gates"].shape == (2, 1, 3, 4, 4) and not probe["audio_gates"].any()
    tokens = torch.randn(2, 2, 3, 4, 16)
    everywhere = spec.feed(x, t, text, audio=AudioCondition(tokens))
    assert everywhere["audio_gates"].shape == (2, 2, 3, 4, 4) and bool((everywhere["audio_gates"] == 1).all())
    masks = torch.rand(2, 2, 3, 4, 4)
    assert spec.feed(x, t, text, audio=AudioCondition(tokens, masks))["audio_gates"] is masks
    outputs = {"sample": torch.zeros(2, 4, 3, 8, 8), "mask_logits": torch.zeros(2, 2, 3, 4, 4)}
    assert spec.result(outputs, predict_masks=False).mask_logits is None
    assert spec.result(outputs, predict_masks=True).mask_logits is outputs["mask_logits"]
    blueprint = stage_spec("blueprint", tiny)
    with pytest.raises(ValueError, match="takes no audio"):
        blueprint.feed(x, t, text, audio=AudioCondition(tokens))  # type: ignore[attr-defined]
    # with zero gates the exported computation equals the backbone without audio, exactly
    dit = tiny.subclip
    module = spec.export_module()
    with torch.no_grad():
        plain = dit(x, t, text).sample
        gated = module(*(probe[n] for n in spec.input_names))[0]
    assert torch.equal(plain, gated)


def test_parse_stages() -> None:
    assert parse_stages("all") == ["blueprint", "subclip", "sr", "vae_decoder"]
    assert parse_stages("subclip,vae_decoder") == ["subclip", "vae_decoder"]
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("subclip,unet")

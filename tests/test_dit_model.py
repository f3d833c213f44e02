"""The DiT engine's models on tiny random configs: adapter, masks, FLF input, sampler."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from diffusers import WanTransformer3DModel

from engines.dit.adapter import AudioAdapter
from engines.dit.model import AudioCondition, AvatarDiT
from engines.dit.sampler import SamplerConfig, sample, shifted_sigmas

Z, MASK = 4, 4  # tiny VAE latent channels; Wan's temporal mask channels


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny convolutions are dominated by thread hand-off on a loaded 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_backbone(in_channels: int = 2 * Z + MASK) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=Z,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
    ).eval()


def tiny_adapter(trained: bool = True) -> AudioAdapter:
    torch.manual_seed(1)
    adapter = AudioAdapter(
        dim=16,
        num_heads=2,
        num_layers=2,
        audio_dim=6,
        audio_window=3,
        mask_block=1,
        max_characters=2,
    ).eval()
    if trained:  # stand-in for loaded weights: zero-initialised projections made non-zero
        gen = torch.Generator().manual_seed(2)
        for block in adapter.blocks:
            block.to_out.weight.data = torch.randn(block.to_out.weight.shape, generator=gen) * 0.5
    return adapter


def inputs(frames: int = 3, chars: int = 1, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 2 * Z + MASK, frames, 8, 8, generator=gen),
        "t": torch.tensor([700.0]),
        "text": torch.randn(1, 5, 16, generator=gen),
        "audio": torch.randn(1, chars, frames, 3, 6, generator=gen),
    }


@torch.no_grad()
def test_fresh_adapter_leaves_backbone_output_unchanged() -> None:
    backbone = tiny_backbone()
    inp = inputs()
    reference = backbone(inp["x"], inp["t"], inp["text"]).sample
    dit = AvatarDiT(backbone, tiny_adapter(trained=False))
    with_audio = dit(inp["x"], inp["t"], inp["text"], audio=dit.project_audio(inp["audio"])).sample
    assert with_audio.shape == (1, Z, 3, 8, 8)
    assert torch.equal(with_audio, reference)
    # and the same adapter once trained does change it (so the check above can fail)
    trained = AvatarDiT(backbone, tiny_adapter(trained=True))
    changed = trained(inp["x"], inp["t"], inp["text"], audio=trained.project_audio(inp["audio"]))
    assert not torch.allclose(changed.sample, reference, atol=1e-4)


@torch.no_grad()
def test_audio_attention_is_frame_local() -> None:
    dit = AvatarDiT(tiny_backbone(), tiny_adapter())
    inp = inputs(frames=3)
    base = dit(inp["x"], inp["t"], inp["text"], audio=dit.project_audio(inp["audio"])).sample
    audio = inp["audio"].clone()
    audio[:, :, 2] = torch.randn_like(audio[:, :, 2])  # only latent frame 2's window changes
    out = dit(inp["x"], inp["t"], inp["text"], audio=dit.project_audio(audio)).sample
    diff = (out - base).abs().amax(dim=(0, 1, 3, 4))
    assert diff[2] > 1e-4
    # self-attention spreads it to other frames in later blocks, but the direct effect is local:
    # with one block the other frames are untouched
    one = AvatarDiT(tiny_backbone(), tiny_adapter())
    one.backbone.blocks = one.backbone.blocks[:1]
    one.adapter.blocks = one.adapter.blocks[:1]
    a = one(inp["x"], inp["t"], inp["text"], audio=one.project_audio(inp["audio"])).sample
    b = one(inp["x"], inp["t"], inp["text"], audio=one.project_audio(audio)).sample
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2], b[:, :, 2])


@torch.no_grad()
def test_first_last_frame_channels_reach_the_model() -> None:
    dit = AvatarDiT(tiny_backbone(), tiny_adapter())
    inp = inputs()
    base = dit(inp["x"], inp["t"], inp["text"]).sample
    for channels in (slice(Z, Z + MASK), slice(Z + MASK, 2 * Z + MASK)):  # mask, then latents
        x = inp["x"].clone()
        x[:, channels, -1] += 1.0  # the last frame's condition only
        assert not torch.allclose(dit(x, inp["t"], inp["text"]).sample, base, atol=1e-5)


@torch.no_grad()
def test_character_with_zero_mask_cannot_influence_output() -> None:
    dit = AvatarDiT(tiny_backbone(), tiny_adapter())
    inp = inputs(chars=2)
    masks = torch.zeros(1, 2, 3, 4, 4)
    masks[:, 0, :, :, :2] = 1.0  # character 0 owns the left half; character 1 nothing
    masks[:, 0, :, :, 2:] = 0.25

    def run(audio: torch.Tensor) -> torch.Tensor:
        return dit(inp["x"], inp["t"], inp["text"], audio=dit.project_audio(audio, masks)).sample

    base = run(inp["audio"])
    other = inp["audio"].clone()
    other[:, 1] = torch.randn_like(other[:, 1]) * 10
    assert torch.equal(run(other), base)  # exact: character 1 is gated out everywhere
    moved = inp["audio"].clone()
    moved[:, 0] = torch.randn_like(moved[:, 0])
    assert not torch.equal(run(moved), base)  # character 0 does speak


@torch.no_grad()
def test_mask_head_predicts_one_mask_per_character_and_explicit_masks_override() -> None:
    dit = AvatarDiT(tiny_backbone(), tiny_adapter())
    inp = inputs(chars=2)
    out = dit(inp["x"], inp["t"], inp["text"], predict_masks=True)
    assert out.mask_logits is not None and out.mask_logits.shape == (1, 2, 3, 4, 4)
    # sampling with predicted masks: the head's weights matter
    audio = dit.project_audio(inp["audio"])
    noise, cond = inp["x"][:, :Z], inp["x"][:, Z:]
    cfg = SamplerConfig(steps=2)
    predicted = sample(dit, noise, cond, inp["text"], cfg, audio=audio)
    assert predicted.mask_logits is not None
    explicit = AudioCondition(audio.tokens, torch.ones(1, 2, 3, 4, 4))
    with_explicit = sample(dit, noise, cond, inp["text"], cfg, audio=explicit).latents
    dit.adapter.mask_head.out.bias.data += 3.0
    assert not torch.equal(sample(dit, noise, cond, inp["text"], cfg, audio=audio).latents, predicted.latents)
    # explicit masks override: the head no longer matters
    assert torch.equal(sample(dit, noise, cond, inp["text"], cfg, audio=explicit).latents, with_explicit)


def test_shifted_sigmas() -> None:
    s = shifted_sigmas(4, 5.0)
    assert s.shape == (5,) and s[0] == 1.0 and s[-1] == 0.0
    assert torch.all(s[1:] < s[:-1])
    assert torch.allclose(shifted_sigmas(4, 1.0), torch.linspace(1, 0, 5))
    assert torch.all(s[1:-1] > torch.linspace(1, 0, 5)[1:-1])  # shift > 1 stays at high noise
    with pytest.raises(ValueError, match="steps"):
        shifted_sigmas(0, 5.0)


@torch.no_grad()
def test_sampler_cfg_uses_negative_prompt_only_when_enabled() -> None:
    dit = AvatarDiT(tiny_backbone(), None)
    inp = inputs()
    noise, cond = inp["x"][:, :Z], inp["x"][:, Z:]
    neg_a, neg_b = torch.zeros(1, 5, 16), torch.ones(1, 5, 16)
    plain = SamplerConfig(steps=4, guidance_scale=1.0)
    a = sample(dit, noise, cond, inp["text"], plain, negative_text=neg_a).latents
    b = sample(dit, noise, cond, inp["text"], plain, negative_text=neg_b).latents
    assert torch.equal(a, b) and a.shape == noise.shape
    cfg = SamplerConfig(steps=4, guidance_scale=3.0)
    c = sample(dit, noise, cond, inp["text"], cfg, negative_text=neg_a).latents
    d = sample(dit, noise, cond, inp["text"], cfg, negative_text=neg_b).latents
    assert not torch.allclose(c, d)
    # a shorter negative prompt is zero-padded to the positive's length (Wan's padding)
    short = torch.randn(1, 2, 16)
    padded = torch.cat([short, torch.zeros(1, 3, 16)], dim=1)
    e = sample(dit, noise, cond, inp["text"], cfg, negative_text=short).latents
    assert torch.equal(e, sample(dit, noise, cond, inp["text"], cfg, negative_text=padded).latents)
    with pytest.raises(ValueError, match="negative_text"):
        sample(dit, noise, cond, inp["text"], cfg)


def test_bad_inputs_are_rejected() -> None:
    dit = AvatarDiT(tiny_backbone(), tiny_adapter())
    inp = inputs()
    with pytest.raises(ValueError, match="channels"):
        dit(inp["x"][:, :5], inp["t"], inp["text"])
    with pytest.raises(ValueError, match="frame windows"):
        dit(inp["x"], inp["t"], inp["text"], audio=dit.project_audio(inputs(frames=2)["audio"]))
    with pytest.raises(ValueError, match="adapter expects"):
        dit.project_audio(torch.zeros(1, 1, 3, 3, 7))
    with pytest.raises(ValueError, match="does not fit"):
        AvatarDiT(tiny_backbone(), AudioAdapter(dim=32, num_heads=2, num_layers=2, mask_block=1))

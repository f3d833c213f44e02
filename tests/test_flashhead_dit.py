"""The FlashHead DiT: the published tensors, loading, shapes and the architecture's invariants.

A tiny checkpoint (2 layers, FFN 64) is written in the published layout by
:mod:`tests.flashhead_layout`; the widths the audio projection fixes stay at
their published sizes, so it has about 149 M parameters. The reference code
cannot run here; diffusers' own Wan transformer, fed through diffusers' Wan
converter, stands in for the parts the two share.
"""

from __future__ import annotations

import logging
import math
import pathlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engines.dit.flashhead import FlashHeadTransformer, load_transformer, transformer_flops
from engines.dit.flashhead.audio import audio_windows
from engines.dit.flashhead.loading import load_into, read_transformer_config
from engines.dit.flashhead.transformer import DROPPED_PREFIXES, apply_rope, group_audio_windows, rope_tables
from engines.dit.loading import CheckpointError
from tests.flashhead_layout import (
    CONFIG_KEYS,
    LITE_CONFIG,
    PRO_CONFIG,
    PUBLISHED_SIZES,
    dit_tensor_shapes,
    safetensors_size,
    tiny_config,
    write_model_folder,
)

CFG = tiny_config(PRO_CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("flashhead") / "Model_Pro"
    return folder, write_model_folder(folder, CFG)


@pytest.fixture(scope="module")
def model(checkpoint: tuple[pathlib.Path, dict[str, torch.Tensor]]) -> FlashHeadTransformer:
    return load_transformer(checkpoint[0], dtype=torch.float32, device="cpu")


def _inputs(frames: int = 9, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, size, size, generator=g)
    y = torch.randn(1, 16, frames, size, size, generator=g)
    context = torch.randn(1, 1 + 4 * (frames - 1), 5, 12, 768, generator=g)
    return x, torch.tensor([937.5]), context, y


def test_published_file_sizes_follow_from_the_reference_tensor_lists() -> None:
    # the exact byte count of a safetensors file fixes every name, shape and dtype in it
    assert safetensors_size(dit_tensor_shapes(PRO_CONFIG)) == PUBLISHED_SIZES[
        "Model_Pro/diffusion_pytorch_model.safetensors"
    ]
    assert safetensors_size(dit_tensor_shapes(LITE_CONFIG)) == PUBLISHED_SIZES[
        "Model_Lite/diffusion_pytorch_model.safetensors"
    ]


@pytest.mark.parametrize("published", [PRO_CONFIG, LITE_CONFIG], ids=["pro", "lite"])
def test_the_architecture_holds_exactly_the_published_tensors(published: dict) -> None:
    with torch.device("meta"):
        full = FlashHeadTransformer(**published)
    assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == dit_tensor_shapes(published)
    assert sum(v.numel() for v in full.state_dict().values()) in (1_507_694_912, 1_526_864_256)


def test_every_published_tensor_loads_and_the_unused_ones_are_dropped(
    checkpoint: tuple[pathlib.Path, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    folder, written = checkpoint
    with caplog.at_level(logging.INFO, logger="engines.dit.flashhead.loading"):
        loaded = load_transformer(folder, dtype=torch.float32, device="cpu")
    state = loaded.state_dict()
    kept = {k for k in written if not k.startswith(DROPPED_PREFIXES)}
    assert set(state) == kept
    assert len(written) - len(kept) == 12  # text_embedding: 2 linears, audio_emb: 2 norms + 2 linears
    assert {k.split(".")[0] for k in set(written) - kept} == {"text_embedding", "audio_emb"}
    for k in kept:
        assert torch.equal(state[k], written[k]), k
    assert "dropped 12 tensors" in caplog.text and "text_embedding.*" in caplog.text


def test_a_bf16_load_holds_one_bf16_copy(checkpoint: tuple[pathlib.Path, dict[str, torch.Tensor]]) -> None:
    loaded = load_transformer(checkpoint[0], dtype=torch.bfloat16, device="cpu")
    params = list(loaded.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {b.dtype for b in loaded.buffers()} <= {torch.bfloat16}
    kept = [s for k, s in dit_tensor_shapes(CFG).items() if not k.startswith(DROPPED_PREFIXES)]
    assert sum(p.numel() for p in params) == sum(math.prod(s) for s in kept)  # 142,250,176
    x, t, context, y = _inputs(frames=2)
    out = loaded(x.bfloat16(), t, context, y.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_a_checkpoint_that_differs_names_each_difference(
    checkpoint: tuple[pathlib.Path, dict[str, torch.Tensor]],
) -> None:
    _, written = checkpoint

    def attempt(state: dict[str, torch.Tensor]) -> str:
        with torch.device("meta"):
            target = FlashHeadTransformer(**CFG)
        target.drop_unused()
        with pytest.raises(CheckpointError) as err:
            load_into(target, pathlib.Path("x.safetensors"), state, state.__getitem__, dtype=torch.float32,
                      device="cpu", drop=DROPPED_PREFIXES)
        return str(err.value)

    missing = {k: v for k, v in written.items() if k != "blocks.1.cross_attn.norm_k.weight"}
    assert "missing blocks.1.cross_attn.norm_k.weight" in attempt(missing)
    extra = {**written, "blocks.2.ffn.0.weight": torch.zeros(3)}
    assert "unexpected blocks.2.ffn.0.weight" in attempt(extra)
    wrong = {**written, "audio_proj.proj1_vf.weight": torch.zeros(512, 12 * 12 * 768)}
    assert "audio_proj.proj1_vf.weight: file (512, 110592) vs model (512, 73728)" in attempt(wrong)


def test_the_published_config_keys_and_bad_configs(tmp_path: pathlib.Path) -> None:
    import json

    config = tmp_path / "config.json"
    published = {"_class_name": "WanModelAudioProject", "_diffusers_version": "0.33.1", **CFG}
    config.write_text(json.dumps(published))
    assert set(json.loads(config.read_text())) == set(CONFIG_KEYS)
    assert read_transformer_config(config) == CFG
    config.write_text(json.dumps({"_class_name": "WanTransformer3DModel", **CFG}))
    with pytest.raises(CheckpointError, match="WanTransformer3DModel"):
        read_transformer_config(config)
    config.write_text(json.dumps({k: v for k, v in CFG.items() if k != "vae_stride"}))
    with pytest.raises(CheckpointError, match="lacks vae_stride"):
        read_transformer_config(config)
    with pytest.raises(ValueError, match="has_image_input"):
        FlashHeadTransformer(**{**CFG, "has_image_input": True})
    with pytest.raises(ValueError, match="fixed at 1536"):
        FlashHeadTransformer(**{**CFG, "dim": 1024, "num_heads": 8})


def test_velocity_keeps_the_reference_shapes_and_rejects_bad_inputs(model: FlashHeadTransformer) -> None:
    x, t, context, y = _inputs()
    out = model(x, t, context, y)
    assert out.shape == (1, 16, 9, 8, 8) and torch.isfinite(out).all()
    assert out.std() > 0.1  # a random model of unit gain moves its input
    with pytest.raises(ValueError, match=r"context has shape \(1, 32, 5, 12, 768\)"):
        model(x, t, context[:, :32], y)
    with pytest.raises(ValueError, match="y has shape"):
        model(x, t, context, y[:, :8])
    with pytest.raises(ValueError, match="not a multiple of the patch 2"):
        model(x[..., :7], t, context, y[..., :7])
    with pytest.raises(ValueError, match="timestep has shape"):
        model(x, torch.tensor(937.5), context, y)


def test_matches_diffusers_wan_transformer_through_its_converter(
    checkpoint: tuple[pathlib.Path, dict[str, torch.Tensor]], model: FlashHeadTransformer
) -> None:
    # With one latent frame the per-frame audio cross-attention is an ordinary cross-attention
    # over that frame's 32 audio tokens, so diffusers' Wan transformer, loaded through its own
    # converter from the published names, must compute the same velocity.
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    _, written = checkpoint
    wan_names = {k: v for k, v in written.items() if not k.startswith(("audio_proj.", "audio_emb."))}
    converted = convert_wan_transformer_to_diffusers(dict(wan_names))
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=32,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=CFG["ffn_dim"], num_layers=CFG["num_layers"],
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )  # fmt: skip
    missing, unexpected = wan.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    wan.condition_embedder.text_embedder = torch.nn.Identity()  # FlashHead feeds audio tokens here
    wan.eval()

    x, t, context, y = _inputs(frames=1)
    first, later = group_audio_windows(context, 4)
    tokens = model.audio_proj(first, later)[:, 0]  # (1, 32, 1536)
    with torch.no_grad():
        ours = model(x, t, context, y)
        theirs = wan(torch.cat([x, y], dim=1), t, tokens, return_dict=False)[0]
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5


def test_rope_is_wans_complex_rotation() -> None:
    # Wan: x as complex pairs times exp(i * pos * theta^(-2k/d)), with [22, 21, 21] pairs for f, h, w
    head_dim, grid = 128, (3, 4, 5)
    cos, sin = rope_tables(head_dim, grid, torch.device("cpu"))
    x = torch.randn(1, 60, 2, head_dim, dtype=torch.float64)
    sizes = [22, 21, 21]
    tables = []
    for n, pairs in zip(grid, sizes, strict=True):
        inv = 1.0 / (10000 ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs)))
        angle = torch.outer(torch.arange(n, dtype=torch.float64), inv)
        tables.append(torch.polar(torch.ones_like(angle), angle))
    f, h, w = grid
    freqs = torch.cat([
        tables[0].view(f, 1, 1, -1).expand(f, h, w, -1),
        tables[1].view(1, h, 1, -1).expand(f, h, w, -1),
        tables[2].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(60, 1, -1)  # fmt: skip
    want = torch.view_as_real(torch.view_as_complex(x.reshape(1, 60, 2, -1, 2)) * freqs).flatten(3)
    got = apply_rope(x.float(), cos, sin)
    assert (got.double() - want).abs().max() < 1e-5


def test_audio_cross_attention_is_local_to_each_latent_frame(model: FlashHeadTransformer) -> None:
    # one block: self-attention runs before the audio, so after it token k depends on audio
    # only through its own latent frame's cross-attention
    block = model.blocks[0]
    frames, per_frame = 3, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, frames * per_frame, 1536, generator=g)
    audio = torch.randn(1, frames, 32, 1536, generator=g)
    t_mod = 0.1 * torch.randn(1, 6, 1536, generator=g)
    rope = rope_tables(128, (frames, 4, 4), torch.device("cpu"))
    changed = audio.clone()
    changed[:, 1] += 1.0
    with torch.no_grad():
        delta = (block(x, changed, t_mod, rope) - block(x, audio, t_mod, rope)).abs().amax(dim=-1)[0]
    per = delta.view(frames, per_frame)
    assert per[1].min() > 1e-3
    assert per[0].max() == 0 and per[2].max() == 0


@pytest.mark.parametrize("stride", [4, 8])
def test_audio_windows_are_grouped_per_latent_frame(stride: int) -> None:
    # embedding i holds the number i: each window row then says which video frame it came from
    n = 1 + 4 * stride
    embedding = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 12, 768)
    context = audio_windows(embedding)
    first, later = group_audio_windows(context, stride)
    assert first.shape == (1, 1, 5, 12, 768)
    assert first[0, 0, :, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert later.shape == (1, 4, 5 + stride - 1, 12, 768)
    for j in range(4):
        a = 1 + stride * j  # first video frame of latent frame j + 1
        want = [min(max(i, 0), n - 1) for i in range(a - 2, a + stride + 2)]
        assert later[0, j, :, 0, 0].tolist() == want


def test_the_timestep_is_embedded_after_the_cast_to_the_model_dtype(model: FlashHeadTransformer) -> None:
    # as in the reference: in bfloat16, 937.5 becomes 936 before the sinusoidal table
    bf16 = model.timestep_embedding(torch.tensor([937.5]), torch.bfloat16)
    assert torch.equal(bf16, model.timestep_embedding(torch.tensor([936.0]), torch.bfloat16))
    fp32 = model.timestep_embedding(torch.tensor([937.5]), torch.float32)
    assert not torch.equal(fp32, model.timestep_embedding(torch.tensor([936.0]), torch.float32))
    zero = model.timestep_embedding(torch.tensor([0.0]), torch.float32)[0]
    assert torch.equal(zero, torch.cat([torch.ones(128), torch.zeros(128)]))


def test_flops_per_step_at_512x512x33_match_torch_flop_counter() -> None:
    with torch.device("meta"):
        full = FlashHeadTransformer(**PRO_CONFIG)
        x, y = torch.empty(1, 16, 9, 64, 64), torch.empty(1, 16, 9, 64, 64)
        context = torch.empty(1, 33, 5, 12, 768)
        counter = FlopCounterMode(display=False)
        with counter:
            full(x, torch.tensor([937.5]), context, y)
    counted = counter.get_total_flops()
    assert abs(transformer_flops(full, (9, 64, 64)) - counted) / counted < 1e-6
    assert 38.8e12 < counted < 38.9e12

"""Loading the DiT engine from local diffusers-format folders (tiny random models)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from engines.dit import (
    RANDOM_WEIGHTS_BANNER,
    CheckpointError,
    build_dit_engine,
    random_components,
    save_components,
)
from engines.dit.conditioning import (
    FEATURE_RATE,
    LocalTextEncoder,
    MelAudioEncoder,
    PrecomputedTextEmbeddings,
    Wav2Vec2AudioEncoder,
)
from engines.dit.loading import WEIGHTS_NAME, load_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny convolutions are dominated by thread hand-off on a loaded 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_tiny_weights(folder: pathlib.Path) -> None:
    """A complete tiny weights folder with precomputed prompt embeddings."""
    components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
    gen = torch.Generator().manual_seed(5)
    assert components.subclip.adapter is not None
    for block in components.subclip.adapter.blocks:  # as if trained: audio matters
        block.to_out.weight.data = torch.randn(block.to_out.weight.shape, generator=gen) * 0.3
    save_components(components, folder)
    PrecomputedTextEmbeddings.save(
        folder / "prompt_embeds.safetensors",
        {
            "": torch.zeros(3, 16),
            "a calm host": torch.randn(4, 16, generator=gen),
        },
    )


def test_save_load_round_trip_in_diffusers_format(tmp_path: pathlib.Path) -> None:
    write_tiny_weights(tmp_path)
    for part in ("vae", "blueprint", "subclip", "audio_adapter", "sr"):
        config = json.loads((tmp_path / part / "config.json").read_text())
        assert "_class_name" in config and (tmp_path / part / WEIGHTS_NAME).is_file()
    engine = build_dit_engine(tmp_path, dtype="fp32")
    assert engine.banner() is None
    again = build_dit_engine(tmp_path, dtype="fp32")
    # a stage backbone loads with diffusers' own loader too: the folder is stock diffusers format
    stock = WanTransformer3DModel.from_pretrained(tmp_path / "subclip").eval()
    ours = engine.parts.subclip.backbone
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, ours.config.in_channels, 2, 8, 8, generator=gen)
    t, text = torch.tensor([500.0]), torch.randn(1, 3, 16, generator=gen)
    with torch.no_grad():
        assert torch.equal(ours(x, t, text).sample, stock(x, t, text).sample)
    for name, tensor in engine.parts.subclip.adapter.state_dict().items():
        assert torch.equal(tensor, again.parts.subclip.adapter.state_dict()[name]), name
    assert engine.parts.subclip.adapter.blocks[0].to_out.weight.abs().sum() > 0


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path: pathlib.Path) -> None:
    write_tiny_weights(tmp_path)
    path = tmp_path / "subclip" / WEIGHTS_NAME
    state = load_file(str(path))
    state.pop("blocks.1.ffn.net.2.bias")
    state["blocks.1.extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model(WanTransformer3DModel, tmp_path / "subclip", dtype=torch.float32)
    assert "blocks.1.ffn.net.2.bias" in str(err.value) and "blocks.1.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="missing keys"):
        build_dit_engine(tmp_path, dtype="fp32")


def test_sharded_checkpoint_and_half_precision_keep_fp32_modules(tmp_path: pathlib.Path) -> None:
    write_tiny_weights(tmp_path)
    folder = tmp_path / "blueprint"
    state = load_file(str(folder / WEIGHTS_NAME))
    keys = sorted(state)
    shards = {
        "part-1.safetensors": keys[: len(keys) // 2],
        "part-2.safetensors": keys[len(keys) // 2 :],
    }
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name))
    (folder / WEIGHTS_NAME).unlink()
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(WanTransformer3DModel, folder, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert torch.equal(
        model.blocks[0].attn1.to_q.weight, state["blocks.0.attn1.to_q.weight"].bfloat16()
    )


def test_build_refuses_without_weights_and_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="--weights DIR.*--random-weights"):
        build_dit_engine(None)
    with pytest.raises(ValueError, match="not both"):
        build_dit_engine(pathlib.Path("/nonexistent"), random_weights=True)
    with pytest.raises(ValueError, match="does not exist"):
        build_dit_engine(pathlib.Path("/nonexistent/weights"))
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        build_dit_engine(None, random_weights=True, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            build_dit_engine(None, random_weights=True, device="cuda")
    with pytest.raises(ValueError, match="not a preset"):
        build_dit_engine(None, random_weights=True, config="70b")
    engine = build_dit_engine(None, random_weights=True, dtype="fp32", config="tiny")
    assert engine.banner() == RANDOM_WEIGHTS_BANNER


def test_missing_text_conditioning_and_mismatched_parts_are_explained(
    tmp_path: pathlib.Path,
) -> None:
    write_tiny_weights(tmp_path)
    (tmp_path / "prompt_embeds.safetensors").unlink()
    with pytest.raises(ValueError, match="text_encoder/ nor prompt_embeds"):
        build_dit_engine(tmp_path, dtype="fp32")
    PrecomputedTextEmbeddings.save(tmp_path / "prompt_embeds.safetensors", {"": torch.zeros(2, 24)})
    with pytest.raises(ValueError, match="text_dim=16.*dim 24"):
        build_dit_engine(tmp_path, dtype="fp32")


def test_precomputed_embeddings_fall_back_to_the_empty_prompt(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "e.safetensors"
    PrecomputedTextEmbeddings.save(path, {"": torch.zeros(2, 4), "hi": torch.ones(3, 4)})
    table = PrecomputedTextEmbeddings(path)
    out = table.encode(["hi", "never seen"])
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[0], torch.ones(3, 4)) and torch.equal(out[1], torch.zeros(3, 4))
    PrecomputedTextEmbeddings.save(path, {"hi": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="no precomputed embedding"):
        PrecomputedTextEmbeddings(path).encode(["other"])


def test_local_text_encoder_folder(tmp_path: pathlib.Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {
        w: i + 3 for i, w in enumerate("a calm host smiles".split())
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(vocab),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder")
    encoder = LocalTextEncoder(tmp_path / "text_encoder", tmp_path / "tokenizer", max_length=6)
    out = encoder.encode(["a calm host", "smiles", "a calm host"])
    assert out.shape == (3, 6, 16) and encoder.dim == 16
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert torch.all(out[0, 3:] == 0) and torch.any(out[0, :3] != 0)  # zeros past the prompt


def test_audio_encoders_give_50_hz_features(tmp_path: pathlib.Path) -> None:
    import transformers

    samples = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1
    mel = MelAudioEncoder(80).features(samples)
    assert mel.shape == (FEATURE_RATE, 80) and torch.isfinite(mel).all()
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
    )
    transformers.Wav2Vec2Model(config).save_pretrained(tmp_path / "audio_encoder")
    encoder = Wav2Vec2AudioEncoder(tmp_path / "audio_encoder")
    feats = encoder.features(samples)
    assert feats.shape == (FEATURE_RATE, 16) and encoder.dim == 16


def test_flf2v_layout_backbones_with_clip_image_embeddings(tmp_path: pathlib.Path) -> None:
    """Wan2.1 I2V/FLF2V checkpoints (image_dim, added K/V, FLF position embedding) run."""
    import transformers

    from engines.base import AUDIO_RATE, AudioSlice, Avatar
    from engines.dit.model import AvatarDiT
    from engines.storyline import default_shot

    components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
    clip_tokens = 5  # 32x32 images in 16x16 patches, plus the class token
    for stage, pos in (("blueprint", None), ("subclip", 2 * clip_tokens)):
        old: AvatarDiT = getattr(components, stage)
        torch.manual_seed(0)
        backbone = WanTransformer3DModel(
            **{k: v for k, v in old.backbone.config.items() if not k.startswith("_")}
            | {"image_dim": 16, "added_kv_proj_dim": 16, "pos_embed_seq_len": pos}
        ).eval()
        setattr(components, stage, AvatarDiT(backbone, old.adapter))
    save_components(components, tmp_path)
    PrecomputedTextEmbeddings.save(
        tmp_path / "prompt_embeds.safetensors", {"": torch.randn(512, 16)}
    )
    with pytest.raises(ValueError, match="image_encoder/"):
        build_dit_engine(tmp_path, dtype="fp32")
    torch.manual_seed(0)
    clip = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    transformers.CLIPVisionModel(clip).save_pretrained(tmp_path / "image_encoder")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(
        tmp_path / "image_processor"
    )
    engine = build_dit_engine(tmp_path, dtype="fp32")
    prepared = engine.prepare(Avatar("a", np.full((64, 64, 3), 120, np.uint8)))
    keys = engine.keyframes(prepared, [default_shot(0, 1)], [0.0, 0.16])
    audio = AudioSlice(start=0.0, samples=np.zeros(AUDIO_RATE, np.float32))
    frames = engine.subclip(prepared, keys[0], keys[1], [audio], [default_shot(0, 1)])
    assert len(frames) == 5 and frames[2].shape == (64, 64, 3)
    embeds = engine.image_embeds_for(engine.parts.subclip, [keys[0].image, keys[1].image])
    assert embeds is not None and embeds.shape == (2, clip_tokens, 16)  # first and last image

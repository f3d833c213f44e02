"""Export specs of the DiT engine's networks, and the shape profiles engines are built for.

One spec per network (as TensorRT's diffusion demo has one model class per
network): input and output names, the axes that may vary and the ranges they
may take, the module that is exported, sample inputs for validation, and the
mapping from an :class:`~engines.dit.model.AvatarDiT` call to named inputs.

- ``blueprint`` and ``sr``: a Wan backbone alone (``hidden_states``,
  ``timestep``, ``encoder_hidden_states`` -> ``sample``).
- ``subclip``: the backbone with the audio adapter; the projected audio and the
  per-character gates are inputs, the mask head's logits an output.
- ``vae_decoder``: the Wan VAE decoder. It decodes latent frame by latent frame
  with a causal cache, a Python loop the exporter unrolls, so its frame count is
  fixed per export (one ONNX per frame count).

Axes are in the network's own units: ``frames``/``height``/``width`` count
*latent* frames and pixels (a 256x256 keyframe is 32x32 latent with the Wan VAE),
``text`` counts text tokens, ``chars`` audio tracks (characters). A
:class:`Profile` gives ``min``/``opt``/``max`` per axis; :func:`serving_profiles`
derives them from what the server renders (sizes, sub-clip lengths, CFG).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from engines.dit.model import AudioCondition, AvatarDiT, DiTOutput

STAGES = ("blueprint", "subclip", "sr", "vae_decoder")
FLASHHEAD_STAGES = ("flashhead_dit", "flashhead_vae_encoder", "flashhead_vae_decoder")
"""The ``flashhead`` engine's networks (specs in :mod:`engines.dit.tensorrt.flashhead`)."""
KNOWN_STAGES = STAGES + FLASHHEAD_STAGES
SPEC_VERSION = 1
"""Bumped when an export wrapper changes what a network computes (invalidates engines)."""

POINTS = ("min", "opt", "max")


class ProfileError(ValueError):
    """A profile (file) that does not fit a stage's spec."""


@dataclass(frozen=True, slots=True)
class Axis:
    """A named dimension that may vary between ``lo`` and ``hi`` (what the network allows)."""

    name: str
    lo: int
    hi: int
    multiple_of: int = 1
    static: bool = False  # fixed per export (min == opt == max), e.g. the VAE's frame loop
    doc: str = ""

    def check(self, value: int, where: str) -> None:
        if not self.lo <= value <= self.hi:
            raise ProfileError(f"{where}: {self.name}={value} is outside {self.lo}..{self.hi} ({self.doc})")
        if value % self.multiple_of:
            raise ProfileError(f"{where}: {self.name}={value} is not a multiple of {self.multiple_of}")


@dataclass(frozen=True, slots=True)
class Dim:
    """One dimension of an input: ``axis * num / den``."""

    axis: str
    num: int = 1
    den: int = 1

    def value(self, axes: Mapping[str, int]) -> int:
        return axes[self.axis] * self.num // self.den


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    dims: tuple[int | Dim, ...]
    kind: Literal["latent", "timestep", "embedding", "gate"] = "latent"
    float32: bool = False  # always float32 (else the network's dtype)

    def shape(self, axes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d.value(axes) for d in self.dims)


@dataclass(frozen=True, slots=True)
class Profile:
    """``min``/``opt``/``max`` of every axis of one stage: one TensorRT optimisation profile."""

    stage: str
    name: str
    axes: dict[str, tuple[int, int, int]]

    def point(self, which: str) -> dict[str, int]:
        i = POINTS.index(which)
        return {a: v[i] for a, v in self.axes.items()}

    def contains(self, axes: Mapping[str, int]) -> bool:
        return all(lo <= axes[a] <= hi for a, (lo, _, hi) in self.axes.items())

    def static_value(self, axis: str) -> int | None:
        lo, _, hi = self.axes[axis]
        return lo if lo == hi else None

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "name": self.name, "axes": {a: list(v) for a, v in self.axes.items()}}


# --------------------------------------------------------------------------- export wrappers
class DitExport(nn.Module):
    """``AvatarDiT`` with tensors only in and out (no audio: blueprint, sr)."""

    def __init__(self, dit: AvatarDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.dit(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=image_embeds
        )
        return out.sample


class SubclipExport(nn.Module):
    """``AvatarDiT`` with its adapter: explicit gates in, mask logits out (always computed)."""

    def __init__(self, dit: AvatarDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        audio_gates: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.dit(
            hidden_states,
            timestep,
            encoder_hidden_states,
            audio=AudioCondition(audio_tokens, audio_gates),
            encoder_hidden_states_image=image_embeds,
            predict_masks=True,
        )
        assert out.mask_logits is not None
        return out.sample, out.mask_logits


class VaeDecoderExport(nn.Module):
    """Raw (un-normalised) latents -> video in [-1, 1]: ``AutoencoderKLWan.decode``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample  # type: ignore[operator,no-any-return]


# --------------------------------------------------------------------------- specs
@dataclass
class ExportSpec:
    """What one network exports: names, axes, the module, sample inputs."""

    stage: ClassVar[str] = ""
    module: nn.Module
    dtype: torch.dtype
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[str, ...] = ()
    axes: dict[str, Axis] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # what the network's shape depends on

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def export_module(self) -> nn.Module:
        raise NotImplementedError

    def dynamic_axes(self) -> list[str]:
        return [a for a, ax in self.axes.items() if not ax.static]

    def validate(self, profile: Profile, where: str = "") -> None:
        where = where or f"profile {profile.name!r} ({profile.stage})"
        if profile.stage != self.stage:
            raise ProfileError(f"{where} is for stage {profile.stage!r}, not {self.stage!r}")
        missing = sorted(set(self.axes) - set(profile.axes))
        extra = sorted(set(profile.axes) - set(self.axes))
        if missing or extra:
            raise ProfileError(
                f"{where}: axes must be exactly {sorted(self.axes)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
            )
        for name, (lo, opt, hi) in profile.axes.items():
            if not lo <= opt <= hi:
                raise ProfileError(f"{where}: {name} needs min <= opt <= max, got {lo}, {opt}, {hi}")
            axis = self.axes[name]
            for v in (lo, opt, hi):
                axis.check(v, where)
            if axis.static and lo != hi:
                raise ProfileError(
                    f"{where}: {name} is fixed per export for {self.stage} ({axis.doc}); "
                    f"give min = opt = max (one profile per value), got {lo}..{hi}"
                )

    def shapes(self, profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per input: its (min, opt, max) shapes, as a TensorRT optimisation profile takes them."""
        self.validate(profile)
        return {i.name: tuple(i.shape(profile.point(p)) for p in POINTS) for i in self.inputs}

    def trace_axes(self, static: Mapping[str, int]) -> dict[str, int]:
        """Axis values to trace the export at: 2 or more where the axis varies (1 would specialise)."""
        out: dict[str, int] = {}
        for name, ax in self.axes.items():
            if ax.static:
                out[name] = static[name]
                continue
            m = ax.multiple_of
            v = -(-max(2 * m, ax.lo) // m) * m
            out[name] = v if v <= ax.hi else ax.hi
        return out

    def sample_inputs(
        self, axes: Mapping[str, int], seed: int = 0, device: str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes, ranges and dtypes (for checks and benchmarks)."""
        gen = torch.Generator().manual_seed(seed)
        feed: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            shape = spec.shape(axes)
            if spec.kind == "timestep":
                value = torch.rand(shape, generator=gen) * 1000.0
            elif spec.kind == "gate":
                value = torch.rand(shape, generator=gen)
            else:
                value = torch.randn(shape, generator=gen)
            feed[spec.name] = value.to(device, torch.float32 if spec.float32 else self.dtype)
        return feed

    def axes_of(self, feed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Axis values of concrete inputs; ``ValueError`` when shapes disagree with the spec."""
        axes: dict[str, int] = {}
        for spec in self.inputs:
            shape = tuple(feed[spec.name].shape)
            if len(shape) != len(spec.dims):
                raise ValueError(
                    f"{self.stage}: {spec.name} has rank {len(shape)}, expected {len(spec.dims)}"
                )
            for size, dim in zip(shape, spec.dims, strict=True):
                if isinstance(dim, int):
                    if size != dim:
                        raise ValueError(f"{self.stage}: {spec.name} has shape {shape}; expected {spec.dims}")
                    continue
                value = size * dim.den // dim.num
                if axes.setdefault(dim.axis, value) != value:
                    raise ValueError(
                        f"{self.stage}: inputs disagree on axis {dim.axis} ({spec.name} {shape})"
                    )
        return axes


def _image_input(dit: AvatarDiT) -> InputSpec | None:
    cfg = dit.backbone.config
    if cfg.image_dim is None:
        return None
    tokens = 514 if cfg.pos_embed_seq_len is not None else 257  # CLIP ViT-H/14: 257 per image (FLF2V: 2)
    return InputSpec("image_embeds", (Dim("batch"), tokens, int(cfg.image_dim)), "embedding")


def _dit_axes(dit: AvatarDiT, text_max: int) -> dict[str, Axis]:
    _, ph, pw = dit.patch_size
    rope = int(dit.backbone.config.rope_max_seq_len)
    return {
        "batch": Axis("batch", 1, 8, doc="CFG doubles it"),
        "frames": Axis("frames", 1, min(rope, 128), doc="latent frames"),
        "height": Axis("height", ph, min(rope * ph, 512), ph, doc=f"latent height, a multiple of {ph}"),
        "width": Axis("width", pw, min(rope * pw, 512), pw, doc=f"latent width, a multiple of {pw}"),
        "text": Axis("text", 1, text_max, doc="text tokens (distinct prompts joined)"),
    }


@dataclass
class DitSpec(ExportSpec):
    """``blueprint`` and ``sr``: the backbone alone."""

    stage: ClassVar[str] = "blueprint"

    @classmethod
    def build(cls, dit: AvatarDiT, text_max: int) -> DitSpec:
        cfg = dit.backbone.config
        _, ph, pw = dit.patch_size
        inputs = [
            InputSpec(
                "hidden_states", (Dim("batch"), dit.in_channels, Dim("frames"), Dim("height"), Dim("width"))
            ),
            InputSpec("timestep", (Dim("batch"),), "timestep", float32=True),
            InputSpec("encoder_hidden_states", (Dim("batch"), Dim("text"), int(cfg.text_dim)), "embedding"),
        ]
        image = _image_input(dit)
        if image is not None:
            inputs.append(image)
        config = {"backbone": _plain(cfg), "adapter": None}
        return cls(
            module=dit,
            dtype=dit.dtype,
            inputs=tuple(inputs),
            outputs=("sample",),
            axes=_dit_axes(dit, text_max),
            config=config,
        )

    def export_module(self) -> nn.Module:
        assert isinstance(self.module, AvatarDiT)
        return DitExport(self.module).eval()

    def feed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        *,
        audio: AudioCondition | None = None,
        image: torch.Tensor | None = None,
        predict_masks: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Named inputs for one ``AvatarDiT`` call."""
        if audio is not None or predict_masks:
            raise ValueError(f"the {self.stage} network takes no audio and predicts no masks")
        feed = {"hidden_states": x, "timestep": t, "encoder_hidden_states": text}
        if "image_embeds" in self.input_names:
            if image is None:
                raise ValueError(f"the {self.stage} network needs CLIP image embeddings")
            feed["image_embeds"] = image
        return feed

    def result(self, outputs: Mapping[str, torch.Tensor], predict_masks: bool) -> DiTOutput:
        return DiTOutput(sample=outputs["sample"])


@dataclass
class SrSpec(DitSpec):
    stage: ClassVar[str] = "sr"


@dataclass
class SubclipSpec(DitSpec):
    """``subclip``: backbone + audio adapter. Gates of 0 leave a block's audio out exactly."""

    stage: ClassVar[str] = "subclip"

    @classmethod
    def build(cls, dit: AvatarDiT, text_max: int) -> SubclipSpec:
        base = DitSpec.build(dit, text_max)
        adapter = dit.adapter
        if adapter is None:
            raise ValueError("the sub-clip DiT has no audio adapter")
        acfg = adapter.config
        _, ph, pw = dit.patch_size
        width = int(acfg.dim)
        audio = [
            InputSpec(
                "audio_tokens",
                (Dim("batch"), Dim("chars"), Dim("frames"), int(acfg.audio_window), width),
                "embedding",
            ),
            InputSpec(
                "audio_gates",
                (Dim("batch"), Dim("chars"), Dim("frames"), Dim("height", 1, ph), Dim("width", 1, pw)),
                "gate",
            ),
        ]
        inputs = (*base.inputs[:3], *audio, *base.inputs[3:])
        axes = dict(base.axes)
        axes["chars"] = Axis("chars", 1, int(acfg.max_characters), doc="audio tracks (characters)")
        config = dict(base.config, adapter=_plain(acfg))
        return cls(
            module=dit,
            dtype=dit.dtype,
            inputs=inputs,
            outputs=("sample", "mask_logits"),
            axes=axes,
            config=config,
        )

    def export_module(self) -> nn.Module:
        assert isinstance(self.module, AvatarDiT)
        return SubclipExport(self.module).eval()

    def feed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        *,
        audio: AudioCondition | None = None,
        image: torch.Tensor | None = None,
        predict_masks: bool = False,
    ) -> dict[str, torch.Tensor]:
        feed = {"hidden_states": x, "timestep": t, "encoder_hidden_states": text}
        b, _, f, h, w = x.shape
        dit = self.module
        assert isinstance(dit, AvatarDiT) and dit.adapter is not None
        _, ph, pw = dit.patch_size
        window, width = int(dit.adapter.config.audio_window), int(dit.adapter.config.dim)
        if audio is None:  # no audio: zero gates leave every audio block out (the mask-probe pass)
            feed["audio_tokens"] = x.new_zeros(b, 1, f, window, width)
            feed["audio_gates"] = x.new_zeros(b, 1, f, h // ph, w // pw)
        else:
            feed["audio_tokens"] = audio.tokens
            masks = audio.masks
            if masks is None:
                masks = x.new_ones(b, audio.tokens.shape[1], f, h // ph, w // pw)
            feed["audio_gates"] = masks
        if "image_embeds" in self.input_names:
            if image is None:
                raise ValueError("the subclip network needs CLIP image embeddings")
            feed["image_embeds"] = image
        return feed

    def result(self, outputs: Mapping[str, torch.Tensor], predict_masks: bool) -> DiTOutput:
        return DiTOutput(
            sample=outputs["sample"], mask_logits=outputs["mask_logits"] if predict_masks else None
        )


@dataclass
class VaeDecoderSpec(ExportSpec):
    stage: ClassVar[str] = "vae_decoder"

    @classmethod
    def build(cls, vae: nn.Module) -> VaeDecoderSpec:
        cfg: Any = vae.config
        z = int(cfg.z_dim)
        dtype = next(vae.parameters()).dtype
        axes = {
            "batch": Axis("batch", 1, 64, doc="clips, or keyframes decoded as one-frame clips"),
            "frames": Axis(
                "frames",
                1,
                64,
                static=True,
                doc="latent frames; the causal decoder's frame loop is unrolled at export",
            ),
            "height": Axis("height", 1, 512, doc="latent height"),
            "width": Axis("width", 1, 512, doc="latent width"),
        }
        inputs = (InputSpec("latents", (Dim("batch"), z, Dim("frames"), Dim("height"), Dim("width"))),)
        return cls(
            module=vae, dtype=dtype, inputs=inputs, outputs=("video",), axes=axes, config={"vae": _plain(cfg)}
        )

    def export_module(self) -> nn.Module:
        return VaeDecoderExport(self.module).eval()


def _plain(config: Any) -> dict[str, Any]:
    """A model config as plain JSON values (diffusers' FrozenDict, tuples)."""
    return {
        k: v for k, v in json.loads(json.dumps(dict(config), default=list)).items() if not k.startswith("_")
    }


def is_flashhead(components: Any) -> bool:
    """Whether ``components`` are FlashHead's networks (else the dit engine's components)."""
    from engines.dit.flashhead.networks import FlashHeadNetworks

    return isinstance(components, FlashHeadNetworks)


def stage_spec(stage: str, components: Any) -> ExportSpec:
    """The export spec of ``stage`` for loaded :class:`~engines.dit.loading.DitComponents`.

    (or :class:`~engines.dit.flashhead.networks.FlashHeadNetworks` for the ``flashhead_*`` stages).
    """
    if is_flashhead(components):
        from engines.dit.tensorrt.flashhead import flashhead_stage_spec

        return flashhead_stage_spec(stage, components)
    if stage in FLASHHEAD_STAGES:
        raise ValueError(f"{stage} is a flashhead network: load FlashHead weights (--engine flashhead)")
    text_max = 16 * int(components.config.text_max_length)
    if stage == "blueprint":
        return DitSpec.build(components.blueprint, text_max)
    if stage == "subclip":
        return SubclipSpec.build(components.subclip, text_max)
    if stage == "sr":
        if components.sr is None:
            raise ValueError("these weights have no sr/ stage: nothing to export for 'sr'")
        return SrSpec.build(components.sr, text_max)
    if stage == "vae_decoder":
        return VaeDecoderSpec.build(components.vae)
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def parse_stages(text: str | None, components: Any = None) -> list[str]:
    """``--stages a,b`` (default: all of the loaded model's, ``sr`` only where the weights have it).

    Without components (``avatar trt build``), the dit stages by default and any known stage by name.
    """
    flashhead = components is not None and is_flashhead(components)
    known = FLASHHEAD_STAGES if flashhead else STAGES if components is not None else KNOWN_STAGES
    if not text or text == "all":
        if flashhead:
            from engines.dit.tensorrt.flashhead import default_flashhead_stages

            return default_flashhead_stages(components.model)
        return [s for s in STAGES if not (s == "sr" and components is not None and components.sr is None)]
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in known]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; stages are {', '.join(known)}")
    return stages


# --------------------------------------------------------------------------- profiles
def serving_profiles(
    components: Any,
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    subclip_frames: Sequence[int] = (2,),
    keyframes_per_batch: int | None = None,
    characters: int = 1,
    cfg: bool | None = None,
) -> list[Profile]:
    """Profiles covering what the server renders.

    ``sizes`` are keyframe sizes (width, height) in pixels (default: the engine
    config's); SR profiles are at the matching output size. ``subclip_frames``
    are the sub-clip lengths served (``--subclip-frames``). Keyframes come in
    batches of ``max(2, ceil(fps / n))`` (the scheduler's one second ahead);
    CFG (``guidance_scale != 1``) doubles the DiT batch. For FlashHead's
    networks, the fixed shapes of a chunk at each size.
    """
    if is_flashhead(components):
        from engines.dit.tensorrt.flashhead import flashhead_profiles

        return flashhead_profiles(
            components.model,
            spatial_stride=int(components.vae.spatial_stride),
            temporal_stride=int(components.vae.temporal_stride),
            sizes=sizes or ((512, 512),),
        )
    config = components.config
    vae = components.vae.config
    s, ts = int(vae.scale_factor_spatial or 8), int(vae.scale_factor_temporal or 4)
    sizes = list(sizes or [tuple(config.keyframe_size)])
    ow, oh = config.output_size
    kw, kh = config.keyframe_size
    frames_n = sorted(set(subclip_frames))
    if not frames_n or frames_n[0] < 1:
        raise ValueError("subclip_frames must be positive")
    k = keyframes_per_batch or max(2, math.ceil(config.fps / frames_n[0]))
    cfg = config.guidance_scale != 1.0 if cfg is None else cfg
    batch = (1, 1, 2) if cfg else (1, 1, 1)
    text_len = int(config.text_max_length)
    latent_frames = sorted({1 + math.ceil(n / ts) for n in frames_n})
    lf = (latent_frames[0], latent_frames[0], latent_frames[-1])
    out: list[Profile] = []
    for w, h in sizes:
        if w % 16 or h % 16:
            raise ValueError(f"size {w}x{h} must be multiples of 16")
        lw, lh = w // s, h // s
        # SR output size scales with the keyframe size as in the engine config
        sw, sh = (w * ow // kw) // s, (h * oh // kh) // s
        tag = f"{w}x{h}"
        flat = components.blueprint.backbone.config.image_dim is not None
        blueprint_text = (text_len, text_len, text_len) if flat else (text_len, text_len, k * text_len)
        if cfg and not flat:
            blueprint_text = (text_len, text_len, 2 * k * text_len)
        out.append(
            Profile(
                "blueprint",
                tag,
                {
                    "batch": batch,
                    "frames": (2, 1 + k, 1 + k),
                    "height": (lh,) * 3,
                    "width": (lw,) * 3,
                    "text": blueprint_text,
                },
            )
        )
        out.append(
            Profile(
                "subclip",
                f"{tag}-n{'-'.join(map(str, frames_n))}",
                {
                    "batch": batch,
                    "frames": lf,
                    "height": (lh,) * 3,
                    "width": (lw,) * 3,
                    "text": (text_len,) * 3,
                    "chars": (1, 1, characters),
                },
            )
        )
        if components.sr is not None:
            out.append(
                Profile(
                    "sr",
                    f"{sw * s}x{sh * s}-n{'-'.join(map(str, frames_n))}",
                    {
                        "batch": (1, 1, 1),
                        "frames": lf,
                        "height": (sh,) * 3,
                        "width": (sw,) * 3,
                        "text": (text_len,) * 3,
                    },
                )
            )
        out.append(
            Profile(
                "vae_decoder",
                f"{tag}-keyframes",
                {
                    "batch": (1, k, k),
                    "frames": (1, 1, 1),
                    "height": (lh,) * 3,
                    "width": (lw,) * 3,
                },
            )
        )
        for f in latent_frames:
            out.append(
                Profile(
                    "vae_decoder",
                    f"{tag}-f{f}",
                    {
                        "batch": (1, 1, 1),
                        "frames": (f,) * 3,
                        "height": (lh,) * 3,
                        "width": (lw,) * 3,
                    },
                )
            )
            if components.sr is not None:
                out.append(
                    Profile(
                        "vae_decoder",
                        f"{sw * s}x{sh * s}-f{f}",
                        {
                            "batch": (1, 1, 1),
                            "frames": (f,) * 3,
                            "height": (sh,) * 3,
                            "width": (sw,) * 3,
                        },
                    )
                )
    return _dedupe(out)


def _dedupe(profiles: Iterable[Profile]) -> list[Profile]:
    seen: dict[tuple[str, str], Profile] = {}
    for p in profiles:
        key = (p.stage, json.dumps(p.axes, sort_keys=True))
        seen.setdefault(key, p)
    return list(seen.values())


def save_profiles(profiles: Sequence[Profile], path: pathlib.Path) -> None:
    """One profile per line (axes as ``[min, opt, max]``), easy to read and edit."""
    items = ",\n".join("    " + json.dumps(p.to_json()) for p in profiles)
    path.write_text(f'{{\n  "version": 1,\n  "profiles": [\n{items}\n  ]\n}}\n')


def load_profiles(path: pathlib.Path) -> list[Profile]:
    """A profile file: ``{"profiles": [{"stage", "name", "axes": {axis: [min, opt, max]}}]}``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ProfileError(
            f"profile file {path} does not exist: write one with `avatar trt profile -o {path}`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile file {path} is not valid JSON: {exc}") from None
    items = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ProfileError(f'profile file {path} has no "profiles" list')
    out: list[Profile] = []
    names: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        where = f"{path}: profile #{i}"
        try:
            stage, name, axes = item["stage"], str(item.get("name") or f"p{i}"), item["axes"]
        except (KeyError, TypeError):
            raise ProfileError(f'{where} needs "stage" and "axes"') from None
        if stage not in KNOWN_STAGES:
            raise ProfileError(f"{where}: unknown stage {stage!r}; stages are {', '.join(KNOWN_STAGES)}")
        parsed: dict[str, tuple[int, int, int]] = {}
        for axis, value in dict(axes).items():
            if isinstance(value, int):
                value = [value] * 3
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value)):
                raise ProfileError(
                    f"{where}: axis {axis!r} must be [min, opt, max] integers (or one integer)"
                )
            parsed[axis] = (value[0], value[1], value[2])
        if (stage, name) in names:
            raise ProfileError(f"{where}: two {stage} profiles are named {name!r}")
        names.add((stage, name))
        out.append(Profile(stage, name, parsed))
    return out


def profiles_for(spec: ExportSpec, profiles: Sequence[Profile]) -> list[Profile]:
    """The profiles of ``spec``'s stage, each validated against the spec."""
    mine = [p for p in profiles if p.stage == spec.stage]
    for p in mine:
        spec.validate(p)
    return mine


def static_groups(
    spec: ExportSpec, profiles: Sequence[Profile]
) -> dict[tuple[tuple[str, int], ...], list[Profile]]:
    """Profiles grouped by the values of the spec's static axes (one export per group)."""
    groups: dict[tuple[tuple[str, int], ...], list[Profile]] = {}
    static = [a for a, ax in spec.axes.items() if ax.static]
    for p in profiles:
        key = tuple((a, p.axes[a][0]) for a in static)
        groups.setdefault(key, []).append(p)
    return groups


def variant_name(stage: str, static: Sequence[tuple[str, int]]) -> str:
    """``vae_decoder-frames2``: the name of one export of a stage."""
    return "-".join([stage, *(f"{a}{v}" for a, v in static)])

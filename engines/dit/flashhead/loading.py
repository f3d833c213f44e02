"""The published SoulX-FlashHead-1_3B layout, and strict loading of its files.

A user downloads, with their own tools::

    Soul-AILab/SoulX-FlashHead-1_3B/
        Model_Pro/config.json, diffusion_pytorch_model.safetensors   --model pro
        VAE_Wan/Wan2.1_VAE.pth                                       --model pro
        Model_Lite/config.json, diffusion_pytorch_model.safetensors  --model lite
        VAE_LTX/config.json, diffusion_pytorch_model.safetensors     --model lite
    facebook/wav2vec2-base-960h/
        config.json, preprocessor_config.json, model.safetensors (or pytorch_model.bin)

Only the files of the chosen model are required. Every tensor is checked:
a missing or unexpected name, or a wrong shape, is an error that lists them;
tensors the reference builds but never runs (:data:`DROPPED_PREFIXES`) are
dropped with a log line. Tensors are read one at a time and cast straight to
the target dtype and device, so no full-precision copy is held.
"""

from __future__ import annotations

import inspect
import json
import logging
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors import safe_open

from engines.dit.flashhead.transformer import DROPPED_PREFIXES, FlashHeadTransformer
from engines.dit.loading import CheckpointError

logger = logging.getLogger(__name__)

FLASHHEAD_REPO = "Soul-AILab/SoulX-FlashHead-1_3B"
WAV2VEC_REPO = "facebook/wav2vec2-base-960h"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
REFERENCE_CLASS = "WanModelAudioProject"

ModelName = Literal["pro", "lite"]
MODELS: tuple[ModelName, ...] = ("pro", "lite")


class LayoutError(CheckpointError):
    """A weights folder that is not the published layout; the message names each missing file."""


@dataclass(frozen=True, slots=True)
class FlashHeadFiles:
    """Paths of one model's published files (all checked to exist)."""

    model: ModelName
    transformer: pathlib.Path  # Model_Pro/ or Model_Lite/
    vae: pathlib.Path  # VAE_Wan/Wan2.1_VAE.pth or VAE_LTX/
    wav2vec: pathlib.Path


def _required(model: ModelName) -> tuple[str, str, tuple[str, ...]]:
    if model == "pro":
        return "Model_Pro", "VAE_Wan/Wan2.1_VAE.pth", ("VAE_Wan/Wan2.1_VAE.pth",)
    return "Model_Lite", "VAE_LTX", ("VAE_LTX/config.json", f"VAE_LTX/{WEIGHTS_NAME}")


def model_name(model: str) -> ModelName:
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {', '.join(MODELS)}")
    return "pro" if model == "pro" else "lite"


def _weights_problems(weights: pathlib.Path, name: ModelName) -> list[str]:
    dit, _, vae_files = _required(name)
    if not weights.is_dir():
        return [
            f"the weights folder {weights} does not exist (the {FLASHHEAD_REPO} folder, published at "
            f"https://huggingface.co/{FLASHHEAD_REPO})"
        ]
    missing = [
        p for p in (f"{dit}/config.json", f"{dit}/{WEIGHTS_NAME}", *vae_files) if not (weights / p).is_file()
    ]
    if missing:
        return [
            f"{weights} is not the published {FLASHHEAD_REPO} layout for --model {name}: missing "
            f"{', '.join(missing)} (published at https://huggingface.co/{FLASHHEAD_REPO})"
        ]
    return []


def model_files(weights: pathlib.Path, model: str) -> tuple[ModelName, pathlib.Path, pathlib.Path]:
    """``(model, DiT folder, VAE path)`` of one published model (no audio encoder needed)."""
    name = model_name(model)
    weights = pathlib.Path(weights)
    problems = _weights_problems(weights, name)
    if problems:
        raise LayoutError("; ".join(problems))
    dit, vae, _ = _required(name)
    return name, weights / dit, weights / vae


def published_files(weights: pathlib.Path, wav2vec: pathlib.Path, model: str) -> FlashHeadFiles:
    """The files ``model`` needs, or a :class:`LayoutError` naming every one that is missing."""
    name = model_name(model)
    weights, wav2vec = pathlib.Path(weights), pathlib.Path(wav2vec)
    dit, vae, _ = _required(name)
    problems = _weights_problems(weights, name)
    if not wav2vec.is_dir():
        problems.append(
            f"the wav2vec2 folder {wav2vec} does not exist "
            f"(published at https://huggingface.co/{WAV2VEC_REPO})"
        )
    else:
        missing = [p for p in ("config.json", "preprocessor_config.json") if not (wav2vec / p).is_file()]
        if not any((wav2vec / p).is_file() for p in ("model.safetensors", "pytorch_model.bin")):
            missing.append("model.safetensors (or pytorch_model.bin)")
        if missing:
            problems.append(
                f"{wav2vec} is not a wav2vec2 folder: missing {', '.join(missing)} "
                f"(published at https://huggingface.co/{WAV2VEC_REPO})"
            )
    if problems:
        raise LayoutError("; ".join(problems))
    return FlashHeadFiles(name, weights / dit, weights / vae, wav2vec)


def read_transformer_config(path: pathlib.Path) -> dict[str, Any]:
    """The constructor arguments from a published ``config.json`` (unknown extras are logged)."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    cls = raw.get("_class_name")
    if cls not in (None, REFERENCE_CLASS):
        raise CheckpointError(f"{path} describes {cls!r}, not the FlashHead DiT ({REFERENCE_CLASS})")
    known = set(inspect.signature(FlashHeadTransformer.__init__).parameters) - {"self"}
    args = {k: v for k, v in raw.items() if k in known}
    extra = sorted(k for k in raw if k not in known and not k.startswith("_"))
    if extra:
        logger.info("%s: config keys the architecture does not use: %s", path, ", ".join(extra))
    required = ("dim", "in_dim", "ffn_dim", "out_dim", "num_heads", "num_layers", "vae_stride", "patch_size")
    absent = [k for k in required if k not in raw]
    if absent:
        raise CheckpointError(f"{path} lacks {', '.join(absent)}")
    return args


def _list(keys: Iterable[str], limit: int = 12) -> str:
    items = sorted(keys)
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_into(
    model: torch.nn.Module,
    source: pathlib.Path,
    names: Iterable[str],
    read: Callable[[str], torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    rename: Mapping[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> None:
    """Assign every tensor of a checkpoint to ``model`` (built on the meta device), strictly.

    ``names`` are the file's tensor names, ``read(name)`` loads one; ``rename``
    maps a file name to the model's name (errors name the file's names).
    Names starting with one of ``drop`` are skipped and logged.
    """
    rename = rename or {}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    file_names = list(names)
    dropped = [n for n in file_names if n.startswith(drop)] if drop else []
    kept = [n for n in file_names if not (drop and n.startswith(drop))]
    target = {n: rename.get(n, n) for n in kept}
    back = {v: k for k, v in target.items()}
    unexpected = [n for n, t in target.items() if t not in expected]
    missing = [t for t in expected if t not in back]
    if missing or unexpected:
        named = " (as the model names them)" if rename else ""
        raise CheckpointError(
            f"{source} does not hold the tensors of {type(model).__name__}: "
            + (f"missing{named} {_list(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_list(unexpected)}" if unexpected else "")
        )
    state: dict[str, torch.Tensor] = {}
    wrong = []
    for name, tname in target.items():
        tensor = read(name)
        if tuple(tensor.shape) != expected[tname]:
            wrong.append(f"{name}: file {tuple(tensor.shape)} vs model {expected[tname]}")
            continue
        state[tname] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch: {'; '.join(wrong[:10])}")
    model.load_state_dict(state, strict=True, assign=True)
    if dropped:
        logger.info(
            "%s: dropped %d tensors the reference never runs (%s)",
            source,
            len(dropped),
            ", ".join(sorted({n.split(".")[0] + ".*" for n in dropped})),
        )


def load_transformer(
    folder: pathlib.Path, *, dtype: torch.dtype, device: torch.device | str
) -> FlashHeadTransformer:
    """``Model_Pro/`` or ``Model_Lite/`` as published: config.json + one safetensors file."""
    folder = pathlib.Path(folder)
    config = read_transformer_config(folder / "config.json")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise LayoutError(f"{folder} has no {WEIGHTS_NAME}")
    with torch.device("meta"):
        model = FlashHeadTransformer(**config)
    model.drop_unused()
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        load_into(model, weights, f.keys(), f.get_tensor, dtype=dtype, device=device, drop=DROPPED_PREFIXES)
    return model.eval().requires_grad_(False)

"""The DDPM noise-prediction network: a diffusers ``UNet2DModel`` in the sizes of PureGen
(PUREGEN_REFERENCE §2.1), and loading of local diffusers-format checkpoints (e.g. a snapshot of
``google/ddpm-cifar10-32``).

Papers: Ho et al., "Denoising Diffusion Probabilistic Models" (2020), https://arxiv.org/abs/2006.11239;
Bhat et al., "PureGen" (NeurIPS 2024), https://arxiv.org/abs/2405.18627.

Layout at 32×32 (the diffusers "butterflies" tutorial layout): six levels 32→16→8→4→2→1, down blocks
Down, Down, Down, Down, AttnDown, Down and the mirrored up blocks Up, AttnUp, Up, Up, Up, Up. Smaller images
keep fewer levels (:func:`_levels`).
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative.checkpoints import CheckpointError
from puregen_dist.generative.diffusion import DDPMSchedule, EpsModel, memory_format_for

if TYPE_CHECKING:
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

log = logging.getLogger(__name__)


@cache
def diffusers_classes() -> SimpleNamespace:
    """diffusers' UNet classes, imported on first use. Importing diffusers takes about 1.6 s (it pulls in
    ``torch._dynamo`` and ``scipy.stats``), which every CLI command, test process and Ray worker that never
    builds a DDPM would otherwise pay at start-up."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    return SimpleNamespace(UNet2DModel=UNet2DModel, Attention=Attention, AttnProcessor2_0=AttnProcessor2_0,
                           Downsample2D=Downsample2D, ResnetBlock2D=ResnetBlock2D, Upsample2D=Upsample2D)

BLOCK_OUT_CHANNELS: dict[str, tuple[int, ...]] = {
    "S": (32, 32, 64, 64, 128, 128),
    "M": (64, 64, 128, 128, 256, 256),
    "L": (128, 128, 256, 256, 512, 512),
}
DOWN_BLOCKS = ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
UP_BLOCK_OF = {"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}

SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


def _levels(image_size: int) -> int:
    """Resolution levels kept for ``image_size``: the largest L <= 6 such that 2^(L−1) divides the size.

    Each level after the first halves the image, so L levels need image_size divisible by 2^(L−1) (the up path
    must restore the exact sizes, and the image never goes below 1×1). For powers of two this is the largest
    L with 2^(L−1) <= image_size: 32 → 6 (the reference), 16 → 5, 8 → 4; 24 → 4 (24 → 12 → 6 → 3).
    """
    levels = 1
    while levels < len(DOWN_BLOCKS) and image_size % (2 ** levels) == 0:
        levels += 1
    return levels


def _block_types(levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block types of the first ``levels`` levels. When truncation drops the attention level
    (levels < 5), the deepest kept level gets the attention block instead, so at least one remains."""
    down = list(DOWN_BLOCKS[:levels])
    if "AttnDownBlock2D" not in down:
        down[-1] = "AttnDownBlock2D"
    up = [UP_BLOCK_OF[block] for block in reversed(down)]
    return tuple(down), tuple(up)


def build_unet(cfg: DDPMConfig) -> UNet2DModel:
    """A freshly initialised UNet2DModel for ``cfg`` (size S/M/L, channels, image size, layers per block).

    The network maps (B, C, H, W) x_t and (B,) int64 timesteps to ε̂ of the same shape (``.sample``).
    Initialisation draws from the global torch RNG: seed it (inside ``torch.random.fork_rng``) to repeat it.
    """
    levels = _levels(cfg.image_size)
    down, up = _block_types(levels)
    return diffusers_classes().UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=BLOCK_OUT_CHANNELS[cfg.size][:levels],
        down_block_types=down,
        up_block_types=up,
    )


def eps_model(unet: UNet2DModel) -> EpsModel:
    """The UNet as the ε̂ = f(x_t, t) callable of :mod:`puregen_dist.generative.diffusion`.

    A :class:`LeanUNet` over the same modules when it supports the architecture (``lean_supported``), with
    its convolution weights in the memory format that ``diffusion_purify`` gives the inputs on the UNet's
    device: ``unet(x_t, t).sample`` up to float rounding, with less work per call. Else the module call.
    """
    if lean_supported(unet):
        return LeanUNet(unet, memory_format_for(next(unet.parameters()).device))

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        return unet(x_t, t).sample

    return predict


def count_parameters(unet: UNet2DModel) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in unet.parameters())


# ------------------------------------------------------------------------------------------- lean forward

_DOWN_TYPES = {"DownBlock2D", "AttnDownBlock2D"}
_UP_TYPES = {"UpBlock2D", "AttnUpBlock2D"}


class LeanUNet:
    """ε̂ = ``unet(x_t, t).sample`` of a plain DDPM UNet2DModel: the same function of the same parameters,
    computed with less work per call (benchmarks/ddpm.py), equal up to float rounding.

    The σ(GroupNorm) → conv → + time term → σ(GroupNorm) → conv (+ shortcut) residual blocks, the multi-head
    self-attention of ``AttnProcessor2_0``, nearest-neighbour upsampling and strided-conv downsampling are the
    module's, without diffusers' per-module Python (hooks, deprecation and signature checks, identity
    dropouts, divisions by an output scale of 1), with SiLUs and additions done in place, the attention's
    projections applied to contiguous tokens (one matrix product instead of a batched one per row), and the
    convolution weights kept in ``memory_format`` (converted once, not at every call; refreshed when a
    parameter changes). When all rows share one timestep, the time embedding is computed once and each
    block's time term becomes part of its first convolution's bias. Only for UNets that ``lean_supported``
    accepts; a UNet in training mode is called as the module (its dropouts are live then).

    Call: (B, C, H, W) float x_t (channels-last welcome) and (B,) int64 t -> (B, C, H, W) ε̂; rows share
    one timestep when t is one value expanded to B rows (stride 0), as ``diffusion_purify`` passes it.
    """

    def __init__(self, unet: UNet2DModel, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.unet = unet
        self.memory_format = memory_format
        self._weights: dict[nn.Conv2d, tuple[tuple[int, int], Tensor]] = {}

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        u = self.unet
        if u.training:
            return u(x_t, t).sample
        if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) == 0:
            t = t[:1]  # one timestep broadcast to all rows (the reverse loop's t): embed it once
        emb = u.time_embedding(u.time_proj(t).to(u.time_embedding.linear_1.weight.dtype))
        temb = F.silu(emb)  # the σ(emb) every residual block starts from, computed once
        x = self._conv(u.conv_in, x_t)
        skips = [x]
        for block in u.down_blocks:
            for resnet, attn in _pairs(block):
                x = self._attention(attn, self._resnet(resnet, x, temb))
                skips.append(x)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    x = self._downsample(down, x)
                skips.append(x)
        if u.mid_block is not None:
            x = self._resnet(u.mid_block.resnets[0], x, temb)
            for attn, resnet in zip(u.mid_block.attentions, u.mid_block.resnets[1:], strict=True):
                x = self._resnet(resnet, self._attention(attn, x), temb)
        for block in u.up_blocks:
            for resnet, attn in _pairs(block):
                x = self._attention(attn, self._resnet(resnet, torch.cat([x, skips.pop()], dim=1), temb))
            for up in block.upsamplers or ():
                x = self._upsample(up, x)
        return self._conv(u.conv_out, F.silu(u.conv_norm_out(x), inplace=True))

    def _conv(self, conv: nn.Conv2d, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``conv(x)``, with ``bias`` (C_out,) in place of ``conv.bias`` when given."""
        bias = conv.bias if bias is None else bias
        return F.conv2d(x, self._weight(conv), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _weight(self, conv: nn.Conv2d) -> Tensor:
        """``conv.weight`` in ``memory_format``, converted again only when the parameter has changed."""
        w = conv.weight
        if self.memory_format == torch.contiguous_format:
            return w
        key = (w._version, w.data_ptr())
        cached = self._weights.get(conv)
        if cached is None or cached[0] != key:
            cached = key, w.detach().contiguous(memory_format=self.memory_format)
            self._weights[conv] = cached
        return cached[1]

    def _resnet(self, block: ResnetBlock2D, x: Tensor, temb_act: Tensor) -> Tensor:
        """ResnetBlock2D ("default" time norm): conv2(σ(norm2(conv1(σ(norm1(x))) + W σ(emb)))) + shortcut(x)."""
        time_term = block.time_emb_proj(temb_act)  # (B or 1, C_out)
        if time_term.shape[0] == 1:  # one timestep for all rows: a per-channel constant, added as conv1's bias
            bias = time_term[0] if block.conv1.bias is None else block.conv1.bias + time_term[0]
            h = self._conv(block.conv1, F.silu(block.norm1(x), inplace=True), bias)
        else:
            h = self._conv(block.conv1, F.silu(block.norm1(x), inplace=True)).add_(time_term[:, :, None, None])
        h = self._conv(block.conv2, F.silu(block.norm2(h), inplace=True))
        h = h.add_(x if block.conv_shortcut is None else self._conv(block.conv_shortcut, x))
        return h if block.output_scale_factor == 1 else h.div_(block.output_scale_factor)

    @staticmethod
    def _attention(attn: Attention | None, x: Tensor) -> Tensor:
        """Spatial self-attention of ``AttnProcessor2_0`` over the H·W positions, plus the residual."""
        if attn is None:
            return x
        b, c, h, w = x.shape
        tokens = attn.group_norm(x.reshape(b, c, h * w)).transpose(1, 2).contiguous()  # (B, HW, C)
        heads = attn.heads

        def split(z: Tensor) -> Tensor:
            return z.view(b, -1, heads, z.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(attn.to_q(tokens)), split(attn.to_k(tokens)),
                                             split(attn.to_v(tokens)))
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, h * w, -1))
        out = out.transpose(-1, -2).reshape(b, c, h, w).add_(x)
        return out if attn.rescale_output_factor == 1 else out.div_(attn.rescale_output_factor)

    def _downsample(self, down: Downsample2D, x: Tensor) -> Tensor:
        if down.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self._conv(down.conv, x)

    def _upsample(self, up: Upsample2D, x: Tensor) -> Tensor:
        """Nearest ×2 then conv, with Upsample2D's switches to the contiguous format where its workarounds
        apply (CUDA's channels-last upsampling of large batches, huge outputs)."""
        if (x.is_cuda and x.shape[0] >= 64) or x.numel() * 2 > 2 ** 31:
            x = x.contiguous()
        return self._conv(up.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """(resnet, attention or None) in the order the block runs them."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return list(zip(block.resnets, attentions, strict=True))


def lean_supported(unet: nn.Module) -> bool:
    """Whether :class:`LeanUNet` computes this module's function: a UNet2DModel with positional time
    embedding, no class embedding or input centring, Down/AttnDown and Up/AttnUp blocks of "default"
    ResnetBlock2Ds with SiLU, plain zero-padded convolutions, conv down- and nearest+conv upsamplers, and
    ``AttnProcessor2_0`` self-attention with a residual (the layouts of ``build_unet`` and of
    google/ddpm-cifar10-32)."""
    if not isinstance(unet, diffusers_classes().UNet2DModel):
        return False
    cfg = unet.config
    if (cfg.center_input_sample or cfg.time_embedding_type != "positional" or unet.class_embedding is not None
            or not isinstance(unet.conv_norm_out, nn.GroupNorm) or not isinstance(unet.conv_act, nn.SiLU)):
        return False
    if any(type(m) is not nn.Conv2d or m.padding_mode != "zeros" for m in unet.modules()
           if isinstance(m, nn.Conv2d)):
        return False
    mid = [] if unet.mid_block is None else [unet.mid_block]
    return (all(type(b).__name__ in _DOWN_TYPES and _plain_block(b) for b in unet.down_blocks)
            and all(type(b).__name__ in _UP_TYPES and _plain_block(b) for b in unet.up_blocks)
            and all(type(b).__name__ == "UNetMidBlock2D" and _plain_block(b) for b in mid))


def _plain_block(block: nn.Module) -> bool:
    attentions = getattr(block, "attentions", None) or []
    downs = getattr(block, "downsamplers", None) or []
    ups = getattr(block, "upsamplers", None) or []
    d = diffusers_classes()
    return (all(type(r) is d.ResnetBlock2D and _plain_resnet(r) for r in block.resnets)
            and all(a is None or (type(a) is d.Attention and _plain_attention(a)) for a in attentions)
            and all(type(m) is d.Downsample2D and m.norm is None and m.use_conv for m in downs)
            and all(type(u) is d.Upsample2D and u.norm is None and u.use_conv and u.interpolate
                    and not u.use_conv_transpose and u.name == "conv" for u in ups))


def _plain_resnet(block: ResnetBlock2D) -> bool:
    return (block.time_embedding_norm == "default" and block.upsample is None and block.downsample is None
            and not block.skip_time_act and block.time_emb_proj is not None
            and isinstance(block.nonlinearity, nn.SiLU) and isinstance(block.norm1, nn.GroupNorm)
            and isinstance(block.norm2, nn.GroupNorm))


def _plain_attention(attn: Attention) -> bool:
    return (type(attn.processor) is diffusers_classes().AttnProcessor2_0 and isinstance(attn.group_norm, nn.GroupNorm)
            and attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None
            and attn.residual_connection and not attn.is_cross_attention)


# ---------------------------------------------------------------------------------------------- diffusers


def load_diffusers_unet(path: str | Path) -> tuple[UNet2DModel, DDPMSchedule]:
    """Load a LOCAL diffusers-format UNet2DModel and its linear schedule (never downloads).

    ``path`` is either a pipeline snapshot (``unet/`` + ``scheduler/scheduler_config.json``) or a UNet
    directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` + optional
    ``scheduler_config.json``). Without a scheduler config the default schedule (1000 steps, β 1e-4 → 0.02) is
    used. Only safetensors weights are accepted; pickled ``.bin`` weights are refused.

    Raises:
        CheckpointError: missing directory, pickle-only or missing weights, unsupported schedule, failed load.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: DDPM checkpoint directory not found")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    scheduler_file = root / "scheduler" / SCHEDULER_CONFIG if unet_dir != root else root / SCHEDULER_CONFIG
    _check_weights(unet_dir)
    _check_class(unet_dir / "config.json")
    try:
        unet = diffusers_classes().UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True,
                                                               use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{unet_dir}: cannot load a diffusers UNet2DModel ({exc})") from None
    return unet, _schedule_from(scheduler_file)


def _check_weights(unet_dir: Path) -> None:
    if (unet_dir / SAFETENSORS_WEIGHTS).is_file() or (unet_dir / SAFETENSORS_INDEX).is_file():
        return
    pickles = sorted(p.name for p in unet_dir.glob("*.bin"))
    if pickles:
        raise CheckpointError(f"{unet_dir}: only pickled weights found ({', '.join(pickles)}); only "
                              f"safetensors are accepted (convert once, in a trusted environment, with "
                              f"UNet2DModel.from_pretrained(...).save_pretrained(dir, "
                              f"safe_serialization=True))")
    raise CheckpointError(f"{unet_dir}: no {SAFETENSORS_WEIGHTS} found")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _check_class(config_file: Path) -> None:
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: UNet config not found")
    name = _read_json(config_file).get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise CheckpointError(f"{config_file}: holds a {name!r}, only diffusers UNet2DModel is supported")


def _schedule_from(scheduler_file: Path) -> DDPMSchedule:
    """The linear schedule of a diffusers scheduler config; the diffusers defaults when the file is absent."""
    if not scheduler_file.is_file():
        log.info("%s not found: using the default linear schedule (1000 steps, beta 1e-4 -> 0.02)",
                 scheduler_file)
        return DDPMSchedule.linear()
    config = _read_json(scheduler_file)
    kind = config.get("beta_schedule", "linear")
    if kind != "linear":
        raise CheckpointError(f"{scheduler_file}: beta_schedule {kind!r} is not supported; only 'linear' is")
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{scheduler_file}: trained_betas are not supported; only a linear schedule is")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"{scheduler_file}: prediction_type {prediction!r} is not supported; "
                              f"only 'epsilon' is")
    if config.get("variance_type", "fixed_small") != "fixed_small":
        log.warning("%s: variance_type %r ignored; purification uses the posterior variance (fixed_small)",
                    scheduler_file, config["variance_type"])
    try:
        return DDPMSchedule.linear(int(config.get("num_train_timesteps", 1000)),
                                   float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{scheduler_file}: invalid schedule ({exc})") from None

"""CSDformer: the conversion-oriented transformer of CSDformer (docs/methods.md §1.1).

A Spikingformer layout built only from parts that convert exactly to spikes:

* a pure conv tokenizer (five 3x3 convs with BN, max-pool in the stages named by ``pool_stages``);
* BN instead of LayerNorm, placed after every linear layer (it folds away at conversion);
* an activation before every linear layer and every attention product operand: ``relu`` for the
  float model, an LSQ / QCFS quantizer for QAT (and a neuron after conversion);
* NReLU instead of softmax: ``A = act(Q K^T / sqrt(d)) / N``;
* global average pooling over tokens and a linear head.

The constant scales ``1/sqrt(d)`` and ``1/N`` live inside the two :class:`MatMul` modules so that
conversion can absorb them into neuron thresholds without touching ``forward`` code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from csdlab.quant import make_activation

__all__ = ["CSDformer", "ConvBN", "LinearBN", "MatMul", "Attention", "Mlp", "Block", "Tokenizer"]


class ConvBN(nn.Module):
    """3x3 conv (no bias) followed by BatchNorm2d; BN folds into the conv at conversion."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    """Linear layer followed by BatchNorm over the channel dim of a ``[B, N, C]`` token tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        # BN statistics per channel over batch and tokens: [B, N, C] -> [B*N, C]
        return self.bn(x.reshape(-1, x.shape[-1])).view_as(x)


class MatMul(nn.Module):
    """``(a @ b) * scale``, divided by the token count ``a.shape[-1]`` when ``divide_by_tokens``.

    A module rather than an operator so conversion can find it (and replace it by a temporal
    decomposition), and so its constant scale can be absorbed into the next neuron's threshold.
    """

    def __init__(self, scale: float = 1.0, divide_by_tokens: bool = False) -> None:
        super().__init__()
        self.scale = float(scale)
        self.divide_by_tokens = divide_by_tokens

    def total_scale(self, a: Tensor) -> float:
        return self.scale / (a.shape[-1] if self.divide_by_tokens else 1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a @ b) * self.total_scale(a)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, divide_by_tokens={self.divide_by_tokens}"


class Attention(nn.Module):
    """Tailored MSA: act before each linear, BN after, NReLU attention (docs/methods.md §1.1 TMSA)."""

    def __init__(self, dim: int, num_heads: int, act: str = "lsq", levels: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.act_in = make_activation(act, levels)
        self.q = LinearBN(dim, dim, bias=False)
        self.k = LinearBN(dim, dim, bias=False)
        self.v = LinearBN(dim, dim, bias=False)
        self.act_q = make_activation(act, levels)
        self.act_k = make_activation(act, levels)
        self.act_v = make_activation(act, levels)
        self.qk = MatMul(scale=self.head_dim**-0.5)
        self.act_attn = make_activation(act, levels)  # the ReLU of NReLU
        self.av = MatMul(divide_by_tokens=True)  # the 1/N of NReLU
        self.act_out = make_activation(act, levels)
        self.proj = LinearBN(dim, dim, bias=True)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, d]

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        x = self.act_in(x)
        q = self._heads(self.act_q(self.q(x)))
        k = self._heads(self.act_k(self.k(x)))
        v = self._heads(self.act_v(self.v(x)))
        attn = self.act_attn(self.qk(q, k.transpose(-2, -1)))  # [B, H, N, N]
        out = self.act_out(self.av(attn, v))  # [B, H, N, d]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Tailored MLP: ``BN(act2(BN(act1(x) W1 + b1)) W2 + b2)`` (docs/methods.md §1.1 TMLP)."""

    def __init__(self, dim: int, hidden: int, act: str = "lsq", levels: int = 4) -> None:
        super().__init__()
        self.act1 = make_activation(act, levels)
        self.fc1 = LinearBN(dim, hidden)
        self.act2 = make_activation(act, levels)
        self.fc2 = LinearBN(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act2(self.fc1(self.act1(x))))


class Block(nn.Module):
    """``x + TMSA(x)`` then ``x + TMLP(x)``: plain residual adds, no norms."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "lsq",
                 levels: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, act, levels)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, levels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class TokenizerStage(nn.Module):
    """``act -> [MaxPool 3x3 s2 p1] -> Conv3x3 -> BN`` (stage m0 has neither act nor pool)."""

    def __init__(self, in_chs: int, out_chs: int, act: nn.Module, pool: bool) -> None:
        super().__init__()
        self.act = act
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if pool else nn.Identity()
        self.conv = ConvBN(in_chs, out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(self.act(x)))


class Tokenizer(nn.Module):
    """Five conv stages of widths D/8, D/4, D/2, D, D; ``pool_stages`` picks which of m1..m4 pool."""

    def __init__(self, in_chans: int, embed_dim: int, pool_stages: Sequence[int], act: str,
                 levels: int) -> None:
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8 (tokenizer widths D/8..D), got {embed_dim}")
        widths = [in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim, embed_dim]
        self.stages = nn.Sequential(*[
            TokenizerStage(widths[i], widths[i + 1],
                           nn.Identity() if i == 0 else make_activation(act, levels),
                           pool=i in pool_stages)
            for i in range(5)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(x)  # [B, D, H', W']
        return x.flatten(2).transpose(1, 2)  # [B, N, D]


class CSDformer(nn.Module):
    """Conversion-oriented transformer (CSDformer, docs/methods.md §1.1).

    Args:
        img_size: input resolution (square); must be divisible by 2 ** len(pool_stages).
        in_chans: input channels.
        num_classes: classifier outputs.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to D.
        pool_stages: which tokenizer stages (1..4) max-pool; ImageNet (1, 2, 3, 4), CIFAR (3, 4).
        act: ``relu`` (float model), ``lsq`` (QAT, default) or ``qcfs``.
        levels: quantization levels L (= time steps T after conversion).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth rate (linearly increasing over blocks).
        global_pool: only ``avg`` (GAP over tokens) is part of the architecture.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 8, num_heads: int = 8, mlp_ratio: float = 4.0,
                 pool_stages: Sequence[int] = (1, 2, 3, 4), act: str = "lsq", levels: int = 4,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        if isinstance(img_size, (tuple, list)):
            if len(set(img_size)) != 1:
                raise ValueError(f"CSDformer takes square images, got img_size={img_size}")
            img_size = int(img_size[0])
        pool_stages = tuple(sorted(set(int(p) for p in pool_stages)))
        if not set(pool_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"pool_stages must be a subset of (1, 2, 3, 4), got {pool_stages}")
        if img_size % (2 ** len(pool_stages)):
            ok = [s for s in range(8, 2 * img_size + 1, 2 ** len(pool_stages))][:6]
            raise ValueError(
                f"img_size={img_size} cannot be tiled by a tokenizer with {len(pool_stages)} stride-2 "
                f"max-pools (pool_stages={pool_stages}): it must be divisible by {2 ** len(pool_stages)} "
                f"(e.g. {ok}); resize the images or change pool_stages")
        if global_pool != "avg":
            raise ValueError(f"CSDformer uses global average pooling; global_pool={global_pool!r} is not supported")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.pool_stages = pool_stages
        self.act = act
        self.levels = levels
        self.grid_size = img_size // 2 ** len(pool_stages)
        self.num_tokens = self.grid_size**2

        self.tokenizer = Tokenizer(in_chans, embed_dim, pool_stages, act, levels)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth ramp
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, act, levels, dpr[i]) for i in range(depth)
        ])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input of size {tuple(x.shape[-2:])} does not match the model's "
                             f"img_size={self.img_size}; resize the inputs or build the model with that size")
        return self.blocks(self.tokenizer(x))  # [B, N, D]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x.mean(dim=1))  # GAP over tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "tokenizer.stages.0.conv.conv", "classifier": "head", **kwargs}


# The data each variant is built for (CSDformer publishes no weights, so ``url`` is empty): the
# 32-pixel layouts are CIFAR models, the 224-pixel ones ImageNet models. ``data_config_for(model)``
# (csdlab.lit.data) reads these through timm's ``resolve_model_data_config``; the numbers are the
# data module's dataset table (CIFAR-10 / ImageNet rows; a test keeps the two equal). A model
# csdlab trained on another dataset (digits, Fashion-MNIST, CIFAR-100) or at another size records
# its own preparation in the checkpoint's ``datamodule_hyper_parameters``, which takes precedence.
_CIFAR = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bicubic",
              mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

default_cfgs = generate_default_cfgs({
    "csdformer_tiny": _cfg(**_CIFAR),
    "csdformer_4_256": _cfg(**_CIFAR),
    "csdformer_2_384": _cfg(**_CIFAR),
    "csdformer_4_384": _cfg(**_CIFAR),
    "csdformer_8_384": _cfg(),
    "csdformer_8_512": _cfg(),
    "csdformer_8_768": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> CSDformer:
    # user kwargs override the variant's defaults (timm's model_args convention)
    return build_model_with_cfg(CSDformer, variant, pretrained, **{**defaults, **kwargs})


_CIFAR_ARGS = dict(img_size=32, pool_stages=(3, 4))


@register_model
def csdformer_tiny(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-2-64, 4 heads: trains in minutes on a CPU (digits, Fashion-MNIST)."""
    return _create("csdformer_tiny", pretrained, dict(**_CIFAR_ARGS, embed_dim=64, depth=2, num_heads=4), kwargs)


@register_model
def csdformer_4_256(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-4-256, CIFAR layout (64 tokens), 4.15 M parameters at 10 classes."""
    return _create("csdformer_4_256", pretrained, dict(**_CIFAR_ARGS, embed_dim=256, depth=4, num_heads=8), kwargs)


@register_model
def csdformer_2_384(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-2-384, CIFAR layout, 5.76 M parameters at 10 classes."""
    return _create("csdformer_2_384", pretrained, dict(**_CIFAR_ARGS, embed_dim=384, depth=2, num_heads=12), kwargs)


@register_model
def csdformer_4_384(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-4-384, CIFAR layout, 9.32 M parameters at 10 classes (12 heads; 8 for CIFAR-100)."""
    return _create("csdformer_4_384", pretrained, dict(**_CIFAR_ARGS, embed_dim=384, depth=4, num_heads=12), kwargs)


@register_model
def csdformer_8_384(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-8-384, ImageNet layout (196 tokens), 16.81 M parameters."""
    return _create("csdformer_8_384", pretrained, dict(embed_dim=384, depth=8, num_heads=8), kwargs)


@register_model
def csdformer_8_512(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-8-512, ImageNet layout, 29.68 M parameters."""
    return _create("csdformer_8_512", pretrained, dict(embed_dim=512, depth=8, num_heads=8), kwargs)


@register_model
def csdformer_8_768(pretrained: bool = False, **kwargs: Any) -> CSDformer:
    """CSDformer-8-768, ImageNet layout, 66.34 M parameters."""
    return _create("csdformer_8_768", pretrained, dict(embed_dim=768, depth=8, num_heads=8), kwargs)

"""Drop-in LoRA layers: :class:`LoRALinear`, :class:`LoRAConv1d`, :class:`LoRAConvTranspose1d`, :class:`LoRAConv2d`.

Each subclasses its base class, so ``isinstance`` checks, ``.weight``/``.bias`` and the
base class's state-dict keys stay where existing code looks; the LoRA factors are added as
``lora_A`` and ``lora_B`` (shapes in :mod:`rvclora.reference`). The forward pass calls the
functional ops of :mod:`rvclora.ops`, which pick a backend.

Merging never drifts: :meth:`LoRALayer.merge` keeps the unmerged weight aside and
:meth:`LoRALayer.unmerge` restores it bit for bit. A layer's state dict always holds the
*unmerged* base weight (plus the factors), whether or not it is merged at the time, so a
saved model can never get ΔW applied twice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .ops.spec import SPECS, OpSpec

__all__ = [
    "LoRALayer",
    "LoRALinear",
    "LoRAConv1d",
    "LoRAConvTranspose1d",
    "LoRAConv2d",
    "LORA_CLASSES",
    "lora_class_of_kind",
    "check_no_foreign_weight_hooks",
]

T = TypeVar("T", bound="LoRALayer")


def _check_lora_args(r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0 (0 disables LoRA), got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(merge_weights, bool):
        raise ValueError(f"merge_weights must be a bool, got {merge_weights!r}")


def _weight_norm_info(layer: nn.Module) -> tuple[str | None, int | None, Tensor | None, bool]:
    """Detect weight_norm on ``layer``: (kind, dim, folded weight, requires_grad)."""
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            g, v = layer.weight_g, layer.weight_v
            w = torch._weight_norm(v, g, hook.dim).detach()
            return "legacy", hook.dim, w, g.requires_grad or v.requires_grad
    params = getattr(layer, "parametrizations", None)
    if params is not None and "weight" in params:
        plist = params["weight"]
        if len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm":
            raise ValueError(
                f"{type(layer).__name__}.weight has parametrizations {[type(p).__name__ for p in plist]}; "
                "rvclora folds exactly one weight_norm parametrization and nothing else"
            )
        with torch.no_grad():
            w = layer.weight.detach().clone()
        g, v = plist.original0, plist.original1
        return "parametrizations", plist[0].dim, w, g.requires_grad or v.requires_grad
    return None, None, None, False


def check_no_foreign_weight_hooks(layer: nn.Module, name: str = "") -> None:
    """Refuse a layer whose ``weight`` (or ``bias``) is rewritten before each forward by something other
    than weight_norm: legacy ``spectral_norm``, pruning, or any forward pre-hook naming the tensor.

    A LoRA layer computes with its own ``weight`` parameter; such a hook would keep replacing it behind
    the adapter's back (a merge would then change nothing, and merged and unmerged outputs differ).
    weight_norm is folded exactly; parametrizations other than it are refused by :meth:`LoRALayer.from_base`.
    """
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    where = f"{name} ({type(layer).__name__})" if name else type(layer).__name__
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            continue
        target = getattr(hook, "name", getattr(hook, "_tensor_name", None))
        if isinstance(hook, (SpectralNorm, BasePruningMethod, WeightNorm)) or target in ("weight", "bias"):
            raise ValueError(
                f"{where}: its {target or 'weight'} is rewritten by a forward pre-hook "
                f"({type(hook).__name__}); rvclora cannot adapt it exactly. Remove the hook first "
                "(e.g. torch.nn.utils.remove_spectral_norm) or leave this layer out of target_modules"
            )
    params = getattr(layer, "parametrizations", None)
    has_wn = any(isinstance(h, WeightNorm) for h in layer._forward_pre_hooks.values()) or (
        params is not None and "weight" in params
    )
    for t in ("weight", "bias"):
        derived = t not in layer._parameters and getattr(layer, t, None) is not None
        if derived and not (t == "weight" and has_wn):
            raise ValueError(
                f"{where}: {t} is not a parameter of the layer (it is computed from "
                f"{[n for n in layer._parameters if n.startswith(t)] or 'something else'}); rvclora only "
                "adapts layers whose weight is a plain parameter or under weight_norm"
            )


class LoRALayer:
    """The LoRA mixin: low-rank update ``W = W0 + s·ΔW(A, B)``, ``s = lora_alpha / r``.

    Attributes:
        r, lora_alpha, scaling, lora_dropout, merge_weights: as configured.
        merged: whether ΔW is currently folded into ``weight``.
        weight_norm_kind: ``"legacy"``, ``"parametrizations"`` or ``None``: the weight_norm
            the wrapped layer had (folded into ``weight`` at wrap time, exactly).
        weight_norm_dim: the ``dim`` of that weight_norm (``None`` without one).
    """

    base_class: type[nn.Module]
    #: The op this layer runs (:mod:`rvclora.ops.spec`): its kind, factor layout, ΔW and oracle.
    spec: OpSpec
    r: int
    lora_alpha: float
    scaling: float
    lora_dropout: float
    merge_weights: bool
    merged: bool
    weight_norm_kind: str | None
    weight_norm_dim: int | None

    # kind knowledge: all of it from the spec ------------------------------------------
    @property
    def kind(self) -> str:
        """The layer kind of adapter layer records (``"conv1d"``), from :attr:`spec`."""
        return self.spec.kind

    @property
    def lora_groups(self) -> int:
        """The groups the factors are split into (``1`` for a kind without groups)."""
        return int(self.groups) if self.spec.grouped else 1

    @classmethod
    def factor_shapes(cls, layer: nn.Module, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(lora_A shape, lora_B shape)`` of rank ``r`` for the base ``layer`` (a ``base_class`` instance)."""
        g = int(layer.groups) if cls.spec.grouped else 1
        if r % g:
            raise ValueError(f"{cls.__name__}: r={r} must be a multiple of groups={g}")
        return cls.spec.lora_shapes(_weight_shape(cls.spec, layer), g, r)

    def _lora_shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return type(self).factor_shapes(self, r)

    def get_delta_weight(self) -> Tensor:
        """``ΔW`` (scaled) in the base weight's layout, differentiable in ``lora_A``/``lora_B``."""
        return self.spec.delta_weight(self.lora_A, self.lora_B, self.scaling, self.lora_groups, self.weight.shape)

    # shared machinery ----------------------------------------------------------------
    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout, merge_weights)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.lora_dropout = float(lora_dropout)
        self.merge_weights = merge_weights
        self.merged = False
        self._unmerged_weight: Tensor | None = None
        if not hasattr(self, "weight_norm_kind"):
            self.weight_norm_kind = None
            self.weight_norm_dim = None
        if r > 0:
            shape_a, shape_b = self._lora_shapes(r)
            w = self.weight
            self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=w.dtype, device=w.device))
            self.lora_B = nn.Parameter(torch.empty(shape_b, dtype=w.dtype, device=w.device))
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """``A`` Kaiming-uniform (``a = sqrt(5)``), ``B`` zeros: the layer starts equal to its base."""
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _lora_active(self) -> bool:
        return self.r > 0 and not self.merged

    def _dropout_p(self) -> float:
        return self.lora_dropout if self.training else 0.0

    def _versions(self) -> tuple[int, int, int]:
        # In-place updates (optimizer steps, copy_, load) bump a tensor's version counter; .to()/.half() keep it.
        return (self.weight._version, self.lora_A._version, self.lora_B._version)

    def merge(self) -> None:
        """Fold ``ΔW`` into ``weight`` (a no-op if already merged or ``r == 0``)."""
        if self.merged or self.r == 0:
            return
        with torch.no_grad():
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.add_(self.get_delta_weight().to(self.weight.dtype))
        self.merged = True
        self._merged_versions = self._versions()

    def unmerge(self) -> None:
        """Restore the unmerged base weight: bit-identical to before :meth:`merge` when ``weight`` was not
        changed while merged.

        If ``weight`` was updated in place while merged (an optimizer step on a trainable base weight), the
        update is kept, not dropped: the result is ``weight − ΔW`` (exact up to one rounding). If the
        factors changed too, the ``ΔW`` that was merged is no longer known and this raises.
        """
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.copy_(self._base_weight())
        self._unmerged_weight = None
        self.merged = False

    def _base_weight(self) -> Tensor:
        """The unmerged weight of a merged layer (see :meth:`unmerge`), as a tensor not aliasing ``weight``."""
        w_ver, a_ver, b_ver = self._versions()
        if w_ver == self._merged_versions[0]:
            return self._unmerged_weight
        if (a_ver, b_ver) != self._merged_versions[1:]:
            raise RuntimeError(
                f"{type(self).__name__}: both weight and lora_A/lora_B were modified in place while merged, so "
                "the merged ΔW can no longer be removed; unmerge before updating the factors"
            )
        with torch.no_grad():
            return self.weight - self.get_delta_weight().to(self.weight.dtype)

    def train(self, mode: bool = True):
        """Like the base class; entering training mode also unmerges a merged layer (the factors must get
        their gradients), and with ``merge_weights`` leaving it merges."""
        super().train(mode)
        if mode:
            self.unmerge()
        elif self.merge_weights:
            self.merge()
        return self

    def _check_not_training_merged(self) -> None:
        """A merged layer computes its base class's forward: no gradient would reach the factors."""
        if self.training and torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
            raise RuntimeError(
                f"{type(self).__name__}: forward in training mode with gradients enabled while merged: the "
                "LoRA factors would get no gradient; call unmerge() (or .train(), which unmerges) before "
                "training, or .eval() / torch.no_grad() for inference"
            )

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() must also convert the kept unmerged weight, or state_dict() (which
        # returns it while merged) and unmerge() would hand back a stale dtype/device.
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "_unmerged_weight", None) is not None:
            self._unmerged_weight = fn(self._unmerged_weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w = self._base_weight()
            destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.r > 0:
            s += f", r={self.r}, lora_alpha={self.lora_alpha}"
            if self.lora_dropout:
                s += f", lora_dropout={self.lora_dropout}"
        if self.weight_norm_kind:
            s += f", weight_norm={self.weight_norm_kind}(dim={self.weight_norm_dim})"
        return s

    @classmethod
    def from_base(
        cls: type[T],
        layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
    ) -> T:
        """Wrap an existing base layer without copying its weight.

        The new layer shares ``layer``'s parameters (a legacy or parametrizations
        weight_norm is folded into a new plain ``weight``, exactly; ``layer`` itself is left
        untouched). The factors get the base weight's dtype and device.
        """
        base_cls = cls.base_class
        if not isinstance(layer, base_cls):
            raise TypeError(f"{cls.__name__}.from_base expects an {base_cls.__name__}, got {type(layer).__name__}")
        if isinstance(layer, LoRALayer):
            raise TypeError(f"{cls.__name__}.from_base: layer is already a LoRA layer ({type(layer).__name__})")
        check_no_foreign_weight_hooks(layer)
        kind, dim, folded, folded_grad = _weight_norm_info(layer)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, value in layer.__dict__.items():
            # own containers (parameters, buffers, hooks, ...): sharing them would mutate `layer`
            new.__dict__[key] = value.copy() if isinstance(value, dict) else value
        if kind is not None:
            new._forward_pre_hooks = OrderedDict(
                (k, h) for k, h in new._forward_pre_hooks.items() if type(h).__name__ != "WeightNorm"
            )
            new._parameters.pop("weight_g", None)
            new._parameters.pop("weight_v", None)
            new._modules.pop("parametrizations", None)
            new.__dict__.pop("weight", None)
            new.weight = nn.Parameter(folded, requires_grad=folded_grad)
        new.weight_norm_kind = kind
        new.weight_norm_dim = dim
        new._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        new.train(layer.training)
        return new


class LoRALinear(LoRALayer, nn.Linear):
    """``nn.Linear`` + LoRA: ``y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ``; ``lora_A: (r, in)``, ``lora_B: (out, r)``."""

    base_class = nn.Linear
    spec = SPECS["lora_linear"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        **kwargs,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if not self._lora_active():
            if self.merged:
                self._check_not_training_merged()
            return F.linear(x, self.weight, self.bias)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear: input must have last dim in_features={self.in_features}, got {tuple(x.shape)}"
            )
        x, w, b = _autocast(x, self.weight, self.bias)
        _check_dtype(type(self).__name__, x, w)
        return ops.lora_linear(x, w, b, self.lora_A, self.lora_B, self.scaling, self._dropout_p())


def _conv1d_padding(layer: nn.Conv1d) -> tuple[int, int]:
    k, d = layer.kernel_size[0], layer.dilation[0]
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        total = d * (k - 1)
        return (total // 2, total - total // 2)
    return (layer.padding[0], layer.padding[0])


class LoRAConv1d(LoRALayer, nn.Conv1d):
    """``nn.Conv1d`` + LoRA: ``y = conv(x, W) + b + s·conv1x1(conv(D(x), A), B)``.

    ``lora_A: (r, in/g·k)`` is a thin convolution with the base's stride, padding,
    dilation, padding_mode and groups; ``lora_B: (out, r/g)`` a grouped 1×1.
    ``r`` must be a multiple of ``groups``.
    """

    base_class = nn.Conv1d
    spec = SPECS["lora_conv1d"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        **kwargs,
    ) -> None:
        nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)

    def forward(self, input: Tensor) -> Tensor:
        if not self._lora_active():
            if self.merged:
                self._check_not_training_merged()
            return nn.Conv1d.forward(self, input)
        x, unbatched = _batch(type(self).__name__, input, self.in_channels)
        x, w, b = _autocast(x, self.weight, self.bias)
        _check_dtype(type(self).__name__, x, w)
        y = ops.lora_conv1d(
            x,
            w,
            b,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.stride[0],
            _conv1d_padding(self),
            self.dilation[0],
            self.groups,
            self.padding_mode,
            self._dropout_p(),
        )
        return y.squeeze(0) if unbatched else y


class LoRAConvTranspose1d(LoRALayer, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` + exact LoRA: ``y = convT(x, W) + b + s·convT(A·D(x), B)``.

    ``lora_A: (r, in/g)`` projects at the input rate; ``lora_B: (r, out/g·k)`` upsamples
    exactly like the base (same stride, padding, output_padding, dilation, groups), so
    ``ΔW[i, o, t] = s·Σⱼ A[j, i]·B[j, o·k + t]`` per group. ``r`` must be a multiple of ``groups``.
    """

    base_class = nn.ConvTranspose1d
    spec = SPECS["lora_conv_transpose1d"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        **kwargs,
    ) -> None:
        nn.ConvTranspose1d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)

    @classmethod
    def factor_shapes(cls, layer: nn.Module, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if layer.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__}: padding_mode must be 'zeros', got {layer.padding_mode!r}")
        return super().factor_shapes(layer, r)

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not self._lora_active():
            if self.merged:
                self._check_not_training_merged()
            return nn.ConvTranspose1d.forward(self, input, output_size)
        x, unbatched = _batch(type(self).__name__, input, self.in_channels)
        # from the input as given, like the base class: output_size may be (L,), (C, L) unbatched or (N, C, L)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 1, self.dilation
        )
        x, w, b = _autocast(x, self.weight, self.bias)
        _check_dtype(type(self).__name__, x, w)
        y = ops.lora_conv_transpose1d(
            x,
            w,
            b,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.stride[0],
            self.padding[0],
            output_padding[0],
            self.dilation[0],
            self.groups,
            self._dropout_p(),
        )
        return y.squeeze(0) if unbatched else y


def _conv2d_padding(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """The explicit ``(top, bottom, left, right)`` padding of ``layer`` (``'same'`` puts the odd pixel last)."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        out: list[int] = []
        for k, d in zip(layer.kernel_size, layer.dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = layer.padding
    return (ph, ph, pw, pw)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """``nn.Conv2d`` + LoRA: ``y = conv2d(x, W) + b + s·conv1x1(conv2d(D(x), A), B)``.

    ``lora_A: (r, in/g·kh·kw)`` is a thin convolution with the base's stride, padding,
    dilation, padding_mode and groups; ``lora_B: (out, r/g)`` a grouped 1×1.
    ``r`` must be a multiple of ``groups``. RVC's multi-period discriminator is made of these ((k, 1) kernels).
    """

    base_class = nn.Conv2d
    spec = SPECS["lora_conv2d"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        **kwargs,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)

    def forward(self, input: Tensor) -> Tensor:
        if not self._lora_active():
            if self.merged:
                self._check_not_training_merged()
            return nn.Conv2d.forward(self, input)
        x, unbatched = _batch(type(self).__name__, input, self.in_channels, spatial=2)
        x, w, b = _autocast(x, self.weight, self.bias)
        _check_dtype(type(self).__name__, x, w)
        y = ops.lora_conv2d(
            x,
            w,
            b,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.stride,
            _conv2d_padding(self),
            self.dilation,
            self.groups,
            self.padding_mode,
            self._dropout_p(),
        )
        return y.squeeze(0) if unbatched else y


#: Every LoRA layer class; :mod:`rvclora.inject` replaces each ``base_class`` by its LoRA class.
LORA_CLASSES: tuple[type[LoRALayer], ...] = (LoRALinear, LoRAConv1d, LoRAConvTranspose1d, LoRAConv2d)


def lora_class_of_kind(kind: str) -> type[LoRALayer]:
    """The LoRA layer class of a layer-record kind (``"conv1d"`` → :class:`LoRAConv1d`)."""
    for cls in LORA_CLASSES:
        if cls.spec.kind == kind:
            return cls
    raise ValueError(f"layer kind must be one of {tuple(c.spec.kind for c in LORA_CLASSES)}, got {kind!r}")


# --------------------------------------------------------------------------- helpers


def _weight_shape(spec: OpSpec, layer: nn.Module) -> tuple[int, ...]:
    """The weight shape of a base layer, from its attributes (a weight_norm'd weight is not computed for it)."""
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    g = layer.groups
    if spec.transposed:
        return (layer.in_channels, layer.out_channels // g, *layer.kernel_size)
    return (layer.out_channels, layer.in_channels // g, *layer.kernel_size)


def _autocast(x: Tensor, w: Tensor, b: Tensor | None):
    """Follow autocast the way ``nn.Linear``/``nn.Conv1d`` do: cast input, weight and bias.

    The LoRA factors stay in their own dtype; the ops cast them per call, so the optimizer
    keeps updating fp32 factors and ΔW is never folded into a low-precision weight.
    """
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
        b = b.to(dt) if b is not None else None
    return x, w, b


def _check_dtype(name: str, x: Tensor, w: Tensor) -> None:
    if x.dtype != w.dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} does not match weight dtype {w.dtype}")


def _batch(name: str, x: Tensor, in_channels: int, spatial: int = 1) -> tuple[Tensor, bool]:
    if x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != in_channels:
        dims = "T" if spatial == 1 else "H, W"
        raise ValueError(
            f"{name}: input must be (N, C_in={in_channels}, {dims}) or (C_in={in_channels}, {dims}), "
            f"got {tuple(x.shape)}"
        )
    return (x.unsqueeze(0), True) if x.dim() == spatial + 1 else (x, False)

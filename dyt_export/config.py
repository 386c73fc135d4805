"""The one description of a DyT model: geometry, where tokens are dispatched, and the adapters.

Everything that builds, saves, exports or inspects a model reads this dataclass, so a
checkpoint in the toolkit's own format (config in its metadata) rebuilds the exact model
without flags, and ONNX metadata is written from the same fields.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

VARIANTS: tuple[str, ...] = ("mlp", "attn", "attn_mlp", "layer")
"""Where a dispatcher sits (reference, "Model Variants")."""

UNITS_OF_VARIANT: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp",),
    "attn": ("attn",),
    "attn_mlp": ("attn", "mlp"),
    "layer": ("layer",),
}
"""The dispatched units of one block, in execution order; each has a dispatcher and an adapter."""

DISPATCH_MODES: tuple[str, ...] = ("dynamic", "masked", "dense")
"""dynamic: gather active tokens, compute only those (what we ship).
masked: training-time dense multiply by the mask (same numbers, no savings).
dense: every token active, dispatchers unused (the AdaptFormer baseline)."""


def check_dispatch_mode(mode: str) -> None:
    """Refuse a mode outside DISPATCH_MODES: the one message, wherever a mode is chosen."""
    if mode not in DISPATCH_MODES:
        raise UserError(f"unknown dispatch mode {mode!r}; choose one of {', '.join(DISPATCH_MODES)}")


INT8_ACTIVATIONS: tuple[str, ...] = ("static", "dynamic")
"""How activations get their int8 scale: `static`, once from calibration images (QDQ, one
file for ONNX Runtime and OpenVINO); `dynamic`, on every call from the tensor itself (ORT's
dynamic quantization: no calibration; on an AVX2 CPU without VNNI `make bench` run 14 had it
at 1.44-1.57x the fp32 DyT export on ONNX Runtime against static's 1.31-1.39x, and closer to
fp32, but at 0.64-0.71x against static's 0.73-0.83x on OpenVINO; docs/performance.md)."""


def int8_label(activations: str) -> str:
    """`int8` for the default static form, `int8-dynamic` for the other: one name per form for
    files, validation twins and benchmark contenders, so that one form never stands in for
    the other."""
    return "int8" if activations == "static" else f"int8-{activations}"


OPSETS: tuple[int, ...] = (17, 18, 19, 20, 21)
"""ONNX opsets tested end to end. 18 is the default: the newest that ONNX Runtime's CUDA EP
covers for ScatterND (runtime notes)."""
DEFAULT_OPSET: int = 18

THRESHOLD_LOGIT: float = 0.0
"""A token is active iff its dispatcher logit is > 0 (sigmoid > 0.5); exactly 0 is inactive."""

# ViT convention for heads when nothing in a checkpoint says it (reference, "Checkpoints").
HEADS_BY_DIM: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

TOME_VARIANTS: tuple[str, ...] = ("mlp",)
"""Variants that take token merging (ToMe). ToMe merges on every token's attention keys between
attention and the dispatched unit; an attention-dispatching unit computes keys for its active
tokens only, and `layer` dispatch has no point between its attention and its MLP at which all
tokens exist (docs/tome.md)."""

MAX_EXPERTS: int = 64
"""The paper uses 4 experts; far more is a typo that would allocate E full adapters per unit
(`init --experts 100000` ran out of memory instead of saying so)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_tome_r(text: str) -> int | tuple[int, ...]:
    """`--tome-r`'s value: one integer for every block, or a comma list with one per block
    (checked against the depth by DyTConfig)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise UserError(f"--tome-r takes an integer >= 0 or a comma list of them (one per block), got {text!r}")
    return values[0] if len(values) == 1 else values


def unit_module_names(unit: str) -> tuple[str, str]:
    """(adapter, dispatcher) attribute names of a unit on a block.

    The MLP names are the public DyT training code's (`adaptmlp`, `mlp_token_select`), so
    its checkpoints load key for key; the other units follow the same pattern.
    """
    return f"adapt{unit}", f"{unit}_token_select"


@dataclass(frozen=True)
class DyTConfig:
    """A DyT ViT: a timm ViT geometry plus per-block dispatched units and adapters."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    variant: str = "mlp"
    bottleneck: int = 64
    """Adapter bottleneck r; 0 means no adapters (a plain timm ViT, exported dense)."""
    adapter_scale: float = 1.0
    experts: int = 0
    """0: a plain adapter per unit; E >= 1: an MoE-adapter with E experts per unit."""
    dispatch_blocks: tuple[int, ...] | None = None
    """Blocks that carry dispatchers (None: all). The public code's `keep_layers` leaves the
    first blocks without one; those blocks run every token and still have their adapters."""
    tome_r: int | tuple[int, ...] | None = None
    """Token merging (ToMe): tokens merged in each block, one integer for all blocks or one per
    block; None (or all 0) merges nothing. Stored as a per-block tuple, or None; each block
    merges at most half of its non-CLS tokens (`merge_schedule`). docs/tome.md."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form provenance (e.g. calibration, source) carried into metadata; never read back
    as structure."""

    def __post_init__(self) -> None:
        """Refuse any config that cannot be a model, with one line naming the field. Every path
        (flags, `args` of a pickle, a toolkit file's JSON, `init`) builds a DyTConfig, so this
        is the one place values are checked; JSON can hold any type, hence the type checks."""
        if self.variant not in VARIANTS:
            raise UserError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        positive = ("embed_dim", "depth", "num_heads", "mlp_hidden_dim", "patch_size", "img_size",
                    "in_chans", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.bottleneck) or not 0 <= self.bottleneck <= self.embed_dim:
            raise UserError(f"bottleneck must be an integer in 0..embed_dim {self.embed_dim} (0 = no adapters), "
                            f"got {self.bottleneck!r}")
        if not _is_int(self.experts) or not 0 <= self.experts <= MAX_EXPERTS:
            raise UserError(f"experts must be an integer in 0..{MAX_EXPERTS} (0 = plain adapter), got {self.experts!r}")
        if not _is_finite_number(self.adapter_scale):
            raise UserError(f"adapter scale must be a finite number, got {self.adapter_scale!r}")
        object.__setattr__(self, "adapter_scale", float(self.adapter_scale))
        if not isinstance(self.extra, dict):
            raise UserError(f"extra must be a mapping, got {type(self.extra).__name__}")
        if self.experts and not self.bottleneck:
            raise UserError("an MoE-adapter needs a bottleneck > 0")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise UserError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.dispatch_blocks is not None:
            blocks = self.dispatch_blocks
            if not isinstance(blocks, (list, tuple)) or not all(_is_int(b) for b in blocks):
                raise UserError(f"dispatch_blocks must be a list of block indices, got {blocks!r}")
            blocks = tuple(sorted(set(blocks)))
            if any(b < 0 or b >= self.depth for b in blocks):
                raise UserError(f"dispatch_blocks {blocks} outside 0..{self.depth - 1}")
            object.__setattr__(self, "dispatch_blocks", None if len(blocks) == self.depth else blocks)
        object.__setattr__(self, "tome_r", self._checked_tome_r())

    def _checked_tome_r(self) -> tuple[int, ...] | None:
        r = self.tome_r
        if r is None:
            return None
        values = (r,) * self.depth if _is_int(r) else r
        if not isinstance(values, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in values):
            raise UserError(f"tome_r must be an integer >= 0 or a list of them (one per block), got {r!r}")
        if len(values) != self.depth:
            raise UserError(f"tome_r lists {len(values)} values; the model has {self.depth} blocks (one per block)")
        if not any(values):
            return None
        if self.variant not in TOME_VARIANTS:
            raise UserError(f"token merging (ToMe) needs every token's attention keys, which {self.variant} dispatch "
                            f"does not compute for inactive tokens; use it with variant {', '.join(TOME_VARIANTS)}")
        return tuple(values)

    @property
    def units(self) -> tuple[str, ...]:
        return UNITS_OF_VARIANT[self.variant]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def has_dispatcher(self, block: int) -> bool:
        return self.dispatch_blocks is None or block in self.dispatch_blocks

    @property
    def dispatcher_names(self) -> list[str]:
        """`blocks.{i}.{unit}` for every dispatcher, in execution order (the mask output's axis 1)."""
        return [f"blocks.{i}.{u}" for i in range(self.depth) if self.has_dispatcher(i) for u in self.units]

    @property
    def dispatcher_blocks(self) -> list[int]:
        """The block of each dispatcher, in `dispatcher_names` order."""
        return [i for i in range(self.depth) if self.has_dispatcher(i) for _ in self.units]

    @property
    def merge_schedule(self) -> tuple[tuple[int, int], ...]:
        """(tokens entering, tokens merged) of every block. ToMe's cap: at most half of the
        non-CLS tokens, `min(r, (tokens - 1) // 2)`."""
        schedule, tokens = [], self.num_tokens
        for r in self.tome_r or (0,) * self.depth:
            merged = min(r, (tokens - 1) // 2)
            schedule.append((tokens, merged))
            tokens -= merged
        return tuple(schedule)

    @property
    def dispatcher_tokens(self) -> list[int]:
        """Tokens (CLS included) each dispatcher sees, in `dispatcher_names` order: `num_tokens`,
        or fewer after ToMe merges. The `token_masks` output pads each row to `num_tokens`."""
        schedule = self.merge_schedule
        return [schedule[i][0] - schedule[i][1] for i in self.dispatcher_blocks]

    def replace(self, **changes: Any) -> "DyTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dispatch_blocks"] = None if self.dispatch_blocks is None else list(self.dispatch_blocks)
        if self.tome_r is None:  # files without token merging keep the config they always had
            del d["tome_r"]
        else:
            d["tome_r"] = list(self.tome_r)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DyTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"config has unknown fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str, source: object = None) -> "DyTConfig":
        """The config a file's `dyt.config` metadata holds; errors name `source` (the file)
        when given, since the JSON of a damaged or hand-made file can hold anything."""
        try:
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"config metadata is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise UserError("config metadata is not a JSON object")
            return cls.from_dict(d)
        except UserError as e:
            if source is None:
                raise
            raise UserError(f"{source} has an invalid dyt.config: {e}") from None


def check_tome_precision(cfg: DyTConfig, precision: str) -> None:
    """Refuse token merging in a precision other than fp32. Which tokens merge is a discrete
    decision on cosine similarities, and near-ties are common (the demo model: 2 % of its
    merge boundaries within 1e-5); fp16 or int8 rounding decides some of them the other way,
    which moves tokens and their mask positions, and validation cannot yet tell that from an
    error (docs/tome.md)."""
    if cfg.tome_r is not None and precision != "fp32":
        raise UserError(f"token merging (--tome-r) exports in fp32 only: {precision} rounding changes which tokens "
                        "merge on near-tied similarities, which validation cannot yet tell from an error (docs/tome.md)")


def vit_config(name: str, **overrides: Any) -> DyTConfig:
    """DyTConfig for a named ViT geometry ('tiny', 'small', 'base', 'large', 'huge').

    A shortcut for tests and the demo; `dyt-export init` resolves timm names itself.
    """
    geometries = {
        "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_hidden_dim=768),
        "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_hidden_dim=1536),
        "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072),
        "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096),
        "huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_hidden_dim=5120),
    }
    if name not in geometries:
        raise UserError(f"unknown ViT size {name!r}; choose one of {', '.join(geometries)}")
    return DyTConfig(**{**geometries[name], **overrides})

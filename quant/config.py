"""Quantization settings: the user-facing `QuantConfig` and the per-tensor `QuantSpec`.

`QuantConfig` is what a user writes (`quant.w_bits=4` on any command line); it is validated when it
is constructed, so a bad value fails before any model is touched. `QuantConfig.weight_spec()` and
friends turn it into frozen `QuantSpec`s, one per kind of tensor, that the quantizer modules hold.

Bits: 2..8 quantize; 16 or 32 mean "off" (full precision). No other value is accepted.

Weight formats: "minmax" (the paper's grid, shaped by w_symmetric / w_granularity / w_group_size)
or a GGUF-faithful one, "gguf_q4_0" / "gguf_q8_0" (llama.cpp's Q4_0 / Q8_0: blocks of 32 along
in_features, fp16 block scale; see `quant/gguf_formats.py`). A GGUF format fixes the whole grid:
it needs w_bits equal to its own bit width (4 / 8) and takes blocks of 32 whatever w_granularity
says (per_channel, the default, or per_group with w_group_size 32 are accepted; anything else is an
error), so a model trained with it exports to that GGUF type without any loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

from quant.errors import UserError

OFF_BITS = (16, 32)
MIN_BITS, MAX_BITS = 2, 8
GRANULARITIES = ("per_channel", "per_token", "per_group", "per_tensor")
KV_GRANULARITIES = ("per_token", "per_head")
KV_POSITIONS = ("pre_rope", "post_rope")
GGUF_FORMATS = {"gguf_q4_0": 4, "gguf_q8_0": 8}  # format -> bits of its codes
GGUF_BLOCK_SIZE = 32
WEIGHT_FORMATS = ("minmax", *GGUF_FORMATS)
W_QUANTIZERS = ("minmax", "lsq", "ternary")  # minmax: scale from each forward's weight; else a stored scale
W_INITS = ("minmax", "mse")
CLIPS = ("none", "learned")  # activations / K, V: dynamic MinMax scale, or times a learned clip ratio
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_bits(bits: int, name: str = "bits") -> int:
    """Return `bits` if it is 2..8 or 16/32, else raise ValueError naming `name`."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise UserError(f"{name} must be an integer, got {bits!r}")
    if not (MIN_BITS <= bits <= MAX_BITS or bits in OFF_BITS):
        raise UserError(
            f"{name}={bits} is not supported: use {MIN_BITS}..{MAX_BITS} to quantize, "
            f"or 16/32 for full precision"
        )
    return bits


def is_off(bits: int) -> bool:
    return bits in OFF_BITS


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is fake-quantized.

    Args:
        bits: 2..8, or 16/32 for identity.
        symmetric: MinMax symmetric (zero point 0) if True, else asymmetric min/max.
        granularity: per_channel / per_token (one scale per slice along the last dim),
            per_group (groups of `group_size` along the last dim) or per_tensor.
        group_size: required for per_group.
        ste_clip: zero the gradient where |x| >= 2, as the original LLM-QAT code does.
        format: "minmax", or a GGUF format ("gguf_q4_0" / "gguf_q8_0"), which needs its own bits,
            symmetric=True and per_group granularity with group_size 32.
        fast_math: MinMax arithmetic in float32 for float32 inputs instead of float64 (see
            quant/fake_quant.py: not bit-identical to the float64 path; export follows the spec).
        quantizer: "minmax" (scale recomputed from the tensor at each call), "lsq" (a learned step
            size per slice, quant/lsq.py; at 2 bits ParetoQ's stretched grid) or "ternary" (learned
            scale, levels {-s, 0, s}; ignores `bits`). Weights only.
        init: how a stored scale starts: "minmax" or "mse" (per-slice MSE-optimal clipping search);
            minmax with init "mse" keeps the searched scale fixed (RTN / PTQ with a searched clip).
        clip: "none", or "learned": the dynamic symmetric MinMax scale times one learned clip ratio
            per quantizer (starts at 1; quant/lsq.py `clipped_fake_quantize`). Activations and K/V only.
    """

    bits: int = 16
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: Optional[int] = None
    ste_clip: bool = False
    format: str = "minmax"
    fast_math: bool = False
    quantizer: str = "minmax"
    init: str = "minmax"
    clip: str = "none"

    def __post_init__(self):
        check_bits(self.bits)
        self._check_quantizer()
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise UserError(f"per_group granularity needs a positive group_size, got {self.group_size!r}")
        if self.format not in WEIGHT_FORMATS:
            raise UserError(f"unknown format {self.format!r}; choose one of {WEIGHT_FORMATS}")
        if self.format in GGUF_FORMATS and self.enabled:
            grid = (GGUF_FORMATS[self.format], True, "per_group", GGUF_BLOCK_SIZE)
            if (self.bits, self.symmetric, self.granularity, self.group_size) != grid:
                raise UserError(f"format {self.format} needs bits={grid[0]}, symmetric=True, per_group with "
                                 f"group_size={GGUF_BLOCK_SIZE}; got {self}")

    def _check_quantizer(self) -> None:
        if self.quantizer not in W_QUANTIZERS:
            raise UserError(f"unknown quantizer {self.quantizer!r}; choose one of {W_QUANTIZERS}")
        if self.init not in W_INITS:
            raise UserError(f"unknown init {self.init!r}; choose one of {W_INITS}")
        if self.stored_scale and self.enabled and not self.symmetric:
            raise UserError(f"quantizer={self.quantizer} init={self.init} needs a symmetric grid (w_symmetric=True)")
        if self.quantizer == "ternary" and self.format != "minmax":
            raise UserError(f"quantizer=ternary has its own grid: it cannot use format {self.format}")
        if self.clip not in CLIPS:
            raise UserError(f"unknown clip {self.clip!r}; choose one of {CLIPS}")
        if self.clip == "learned" and (self.stored_scale or self.format != "minmax" or not self.symmetric):
            raise UserError("a learned clip ratio scales a dynamic symmetric MinMax grid: it needs quantizer=minmax, "
                            "init=minmax, format=minmax and symmetric=True")

    @property
    def enabled(self) -> bool:
        return not is_off(self.bits)

    @property
    def learned(self) -> bool:
        """The scale is a trained Parameter (lsq / ternary)."""
        return self.quantizer in ("lsq", "ternary")

    @property
    def stored_scale(self) -> bool:
        """The scale is held by the quantizer (learned, or searched once) instead of recomputed."""
        return self.learned or self.init == "mse"

    def check_last_dim(self, size: int, what: str = "tensor") -> None:
        """Raise if a last dimension of `size` cannot be split into groups of `group_size`."""
        if self.granularity == "per_group" and size % self.group_size:
            raise UserError(f"group_size={self.group_size} does not divide the {what}'s last dimension {size}")


@dataclass
class QuantConfig:
    """Fake-quantization settings of a student model (the `quant` section of every config).

    Args:
        w_bits, a_bits, kv_bits: weight / input-activation / KV-cache bits; 16 or 32 = off.
        w_symmetric, a_symmetric, kv_symmetric: symmetric MinMax (the paper) or asymmetric.
        w_granularity: per_channel (one scale per output row, the paper), per_group or per_tensor.
        w_group_size: group size along in_features for per_group.
        a_granularity: per_token (the paper) or per_tensor.
        kv_granularity: per_token (one scale per token over all KV heads, the original code) or
            per_head (one scale per token and head).
        kv_position: pre_rope (K quantized at the k_proj output, the original code) or post_rope
            (after RoPE, what a serving KV cache stores).
        ste_clip: reproduce the original code's gradient zeroing where |x| >= 2; the default is a
            pure identity straight-through estimator.
        weight_format: grid of the weight quantizer; "minmax" is the paper's, "gguf_q4_0" /
            "gguf_q8_0" are llama.cpp's Q4_0 / Q8_0 (see the module docstring).
        targets: names of the decoder linears to quantize.
        fast_math: run the MinMax fake-quant arithmetic of float32 tensors in float32 instead of
            float64 (for GPUs with slow float64; quant/fake_quant.py states the difference).
        w_quantizer: "minmax" (the paper), "lsq" (learned step size per output channel / group;
            ParetoQ's stretched grid at w_bits=2) or "ternary" (learned scale, {-s, 0, s}; the
            weight is quantized whatever w_bits says, as long as it is not 16/32). See quant/lsq.py.
        a_clip, kv_clip: "none" (the paper's dynamic MinMax) or "learned": each activation / K / V
            quantizer's per-token scale times one learned clip ratio (quant/lsq.py), trained with
            the weight scales' learning rate (scale_lr) and no weight decay. Off by default.
        w_init: "minmax" or "mse" (per-slice MSE-optimal clipping search) start of a stored scale;
            with w_quantizer=minmax, "mse" fixes the weight scale to the searched one.
    """

    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16
    w_symmetric: bool = True
    a_symmetric: bool = True
    kv_symmetric: bool = True
    w_granularity: str = "per_channel"
    w_group_size: Optional[int] = None
    a_granularity: str = "per_token"
    kv_granularity: str = "per_token"
    kv_position: str = "pre_rope"
    ste_clip: bool = False
    weight_format: str = "minmax"
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    fast_math: bool = False
    w_quantizer: str = "minmax"
    w_init: str = "minmax"
    a_clip: str = "none"
    kv_clip: str = "none"

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "kv_bits"):
            check_bits(getattr(self, name), name)
        if self.w_granularity not in ("per_channel", "per_group", "per_tensor"):
            raise UserError(f"unknown w_granularity {self.w_granularity!r}; use per_channel, per_group or per_tensor")
        if self.a_granularity not in ("per_token", "per_tensor"):
            raise UserError(f"unknown a_granularity {self.a_granularity!r}; use per_token or per_tensor")
        if self.kv_granularity not in KV_GRANULARITIES:
            raise UserError(f"unknown kv_granularity {self.kv_granularity!r}; use one of {KV_GRANULARITIES}")
        if self.kv_position not in KV_POSITIONS:
            raise UserError(f"unknown kv_position {self.kv_position!r}; use one of {KV_POSITIONS}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise UserError(f"unknown weight_format {self.weight_format!r}; use one of {WEIGHT_FORMATS}")
        if self.weight_format in GGUF_FORMATS:
            self._check_gguf_weight_format()
        if self.w_quantizer == "ternary" and self.weight_format != "minmax":
            raise UserError(f"w_quantizer=ternary has its own grid: it cannot use weight_format={self.weight_format}")
        self.targets = list(self.targets)
        self.weight_spec()  # validates group size
        for name, symmetric in (("a_clip", self.a_symmetric), ("kv_clip", self.kv_symmetric)):
            if getattr(self, name) not in CLIPS:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose one of {CLIPS}")
            if getattr(self, name) == "learned" and not symmetric:
                raise UserError(f"{name}=learned scales a symmetric grid: set {name[:-5]}_symmetric=True")

    def _check_gguf_weight_format(self) -> None:
        fmt, bits = self.weight_format, GGUF_FORMATS[self.weight_format]
        if self.w_bits != bits:
            raise UserError(f"weight_format={fmt} is a {bits}-bit grid: set w_bits={bits} (got w_bits={self.w_bits})")
        if not self.w_symmetric:
            raise UserError(f"weight_format={fmt} fixes its own grid: w_symmetric=False is not supported")
        if self.w_granularity == "per_tensor" or self.w_group_size not in (None, GGUF_BLOCK_SIZE):
            raise UserError(f"weight_format={fmt} uses blocks of {GGUF_BLOCK_SIZE} along in_features: leave "
                             f"w_granularity / w_group_size unset (got {self.w_granularity}, {self.w_group_size})")

    def weight_spec(self) -> QuantSpec:
        kind = {"quantizer": self.w_quantizer, "init": self.w_init}
        if self.w_quantizer == "ternary" and not is_off(self.w_bits):  # ternary codes fit 2 bits
            return QuantSpec(2, True, self.w_granularity, self.w_group_size, self.ste_clip, **kind)
        if self.weight_format in GGUF_FORMATS:
            return QuantSpec(self.w_bits, True, "per_group", GGUF_BLOCK_SIZE, self.ste_clip, self.weight_format,
                             **kind)
        return QuantSpec(self.w_bits, self.w_symmetric, self.w_granularity, self.w_group_size, self.ste_clip,
                         fast_math=self.fast_math, **kind)

    def act_spec(self) -> QuantSpec:
        return QuantSpec(self.a_bits, self.a_symmetric, self.a_granularity, None, self.ste_clip,
                         fast_math=self.fast_math, clip=self.a_clip)

    def kv_spec(self, head_dim: Optional[int] = None) -> QuantSpec:
        """Spec for K/V laid out [..., T, KV_HEADS * D]; per_head becomes groups of `head_dim`."""
        if self.kv_granularity == "per_head":
            return QuantSpec(self.kv_bits, self.kv_symmetric, "per_group", head_dim, self.ste_clip,
                             fast_math=self.fast_math, clip=self.kv_clip)
        return QuantSpec(self.kv_bits, self.kv_symmetric, "per_token", None, self.ste_clip, fast_math=self.fast_math,
                         clip=self.kv_clip)

    @property
    def enabled(self) -> bool:
        return not (is_off(self.w_bits) and is_off(self.a_bits) and is_off(self.kv_bits))

    def tag(self) -> str:
        """Short name such as W4A8KV8 (16 = off)."""
        return f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown QuantConfig keys: {sorted(unknown)}")
        return cls(**data)

"""Fine-grained FP8 E4M3 quantization: the reference for every quantization kernel in csrc/fp8/.

A block of ``bm x bk`` elements of a 2-D operand shares one FP32 scale. Three block shapes are used by the
GEMMs (DeepSeek-V3's recipe):

* ``(1, 128)``   activations, one scale per token per 128 channels along K       (:func:`quantize_1x128`)
* ``(128, 128)`` weights, one scale per 128x128 block                            (:func:`quantize_128x128`)
* ``(128, 1)``   weight-grad operands, one scale per 128 tokens per channel      (:func:`quantize_128x1`)

For each block (tail blocks: only the valid elements; the padding is internal, never the user's tensor)::

    amax  = max |x|                                   over the block, in float32
    scale = max(amax, AMAX_FLOOR) / 448               true float32 division (the kernels divide too)
    scale = pow2_ceil(scale)                          for ScaleFormat.POW2 / UE8M0 only
    q     = e4m3(clamp(x / scale, -448, 448))         true division, round to nearest even

so ``x ~= q * scale``. ``AMAX_FLOOR`` keeps the scale of an all-zero block finite (its ``q`` is exactly
zero). ``pow2_ceil`` works on the float32 bits, as the CUDA kernels do: if any mantissa bit of the
(positive, normal) scale is set, bump the exponent and clear the mantissa. A power-of-two scale makes
``q * scale`` exact and lets the scale be stored as one UE8M0 byte (the biased exponent).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12  # == csrc/fp8/quant.h kAmaxFloor
BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_SHAPES = ((1, BLOCK), (BLOCK, BLOCK), (BLOCK, 1))


class ScaleFormat(str, enum.Enum):
    """How block scales are rounded. ``code`` is the integer the CUDA kernels take (csrc/common/dtypes.h)."""

    FP32 = "fp32"  # amax / 448
    POW2 = "pow2"  # rounded up to a power of two (stored as float32)
    UE8M0 = "ue8m0"  # as POW2; FP8Tensor.scale_ue8m0() packs it into one biased-exponent byte

    @property
    def code(self) -> int:
        return {"fp32": 0, "pow2": 1, "ue8m0": 2}[self.value]

    @classmethod
    def parse(cls, value: ScaleFormat | str, arg: str = "scale_format") -> ScaleFormat:
        try:
            return cls(value)
        except ValueError:
            allowed = [f.value for f in cls]
            raise ValueError(f"{arg}={value!r} is not a scale format; use one of {allowed}") from None


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``scale`` (float32, positive, normal), bit-identical to the kernels."""
    bits = scale.contiguous().view(torch.int32)
    has_mantissa = (bits & 0x007FFFFF) != 0
    exponent = bits & 0x7F800000
    return torch.where(has_mantissa, exponent + 0x00800000, exponent).view(torch.float32)


def scale_from_ue8m0(exponents: torch.Tensor) -> torch.Tensor:
    """Float32 scales ``2**(e - 127)`` from UE8M0 bytes (uint8 biased exponents); inverse of scale_ue8m0."""
    if exponents.dtype != torch.uint8:
        raise TypeError(f"exponents.dtype={exponents.dtype} must be torch.uint8 (UE8M0 biased exponents)")
    return (exponents.to(torch.int32) << 23).view(torch.float32)


@dataclass
class FP8Tensor:
    """An FP8 E4M3 tensor with one FP32 scale per block of its last two dims: ``x ~= data * scale``.

    data:  float8_e4m3fn, the logical shape ``(..., M, K)`` (never padded; ``(K,)`` allowed for 1x128).
    scale: float32, ``(..., ceil(M / bm), ceil(K / bk))`` for ``block = (bm, bk)``; for (1, 128) that is
           ``(..., M, ceil(K / 128))``, i.e. ``data.shape[:-1] + (ceil(K/128),)``.
    block: (1, 128) activations, (128, 128) weights, (128, 1) weight-grad operands (per 128 tokens).
    scale_format: how the scales were rounded (POW2 / UE8M0 scales are powers of two).
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    scale_format: ScaleFormat = ScaleFormat.FP32

    def __post_init__(self) -> None:
        self.block = tuple(self.block)
        self.scale_format = ScaleFormat.parse(self.scale_format)
        if self.block not in BLOCK_SHAPES:
            raise ValueError(f"block={self.block} must be one of {BLOCK_SHAPES}")
        if self.data.dtype != FP8_DTYPE:
            raise TypeError(f"FP8Tensor.data.dtype={self.data.dtype} must be {FP8_DTYPE}")
        if self.scale.dtype != torch.float32:
            raise TypeError(f"FP8Tensor.scale.dtype={self.scale.dtype} must be torch.float32")
        expected = scale_shape(tuple(self.data.shape), self.block)
        if tuple(self.scale.shape) != expected:
            raise ValueError(
                f"FP8Tensor.scale.shape={tuple(self.scale.shape)} must be {expected} for "
                f"data.shape={tuple(self.data.shape)} and block={self.block}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale`` (each scale broadcast over its block), computed in float32, cast to ``dtype``."""
        return (self.data.float() * expand_scale(self.scale, self.block, self.data.shape)).to(dtype)

    def scale_ue8m0(self) -> torch.Tensor:
        """The scales as UE8M0 bytes (uint8 biased exponents, ``scale == 2**(byte - 127)``); same shape."""
        if self.scale_format == ScaleFormat.FP32:
            raise ValueError(
                "scale_ue8m0() needs power-of-two scales: this tensor has scale_format='fp32'; quantize with "
                "scale_format='ue8m0' or 'pow2'"
            )
        return ((self.scale.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)

    def t(self) -> FP8Tensor:
        """Transpose of a 2-D (128, 128)-blocked tensor: the blocks of W (N, K) are the blocks of W.T (K, N),
        so this equals ``quantize_128x128(W.T)`` exactly (no requantization)."""
        if self.block != (BLOCK, BLOCK) or self.data.dim() != 2:
            raise ValueError(
                f"t() needs a 2-D (128, 128)-blocked FP8Tensor, got {self.block=}, {self.shape=}"
            )
        return FP8Tensor(
            self.data.t().contiguous(), self.scale.t().contiguous(), self.block, self.scale_format
        )


def scale_shape(data_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scales of ``data_shape`` blocked by ``block`` over its last two dims."""
    bm, bk = block
    if len(data_shape) == 1:
        if bm != 1:
            raise ValueError(f"a 1-D tensor (shape {data_shape}) can only be blocked (1, {bk}), got {block=}")
        return (ceil_div(data_shape[0], bk),)
    *lead, m, k = data_shape
    return (*lead, ceil_div(m, bm), ceil_div(k, bk))


def expand_scale(scale: torch.Tensor, block: tuple[int, int], data_shape: torch.Size) -> torch.Tensor:
    """Broadcast block scales to one scale per element of ``data_shape`` (float32)."""
    bm, bk = block
    if len(data_shape) == 1:
        return scale.repeat_interleave(bk, dim=-1)[: data_shape[0]]
    m, k = data_shape[-2], data_shape[-1]
    s = scale
    if bm > 1:
        s = s.repeat_interleave(bm, dim=-2)[..., :m, :]
    if bk > 1:
        s = s.repeat_interleave(bk, dim=-1)[..., :k]
    return s


def quantize_blockwise(
    x: torch.Tensor,
    block_m: int,
    block_k: int,
    *,
    scale_format: ScaleFormat | str = ScaleFormat.FP32,
    check_finite: bool = True,
    arg: str = "x",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last two dims of ``x`` (..., M, K) in blocks of ``block_m x block_k`` (any sizes >= 1).

    Returns ``(q, scale)``: q float8_e4m3fn (..., M, K), scale float32 (..., ceil(M/bm), ceil(K/bk)).
    The general form behind the three recipes; ``block_m=M, block_k=K`` is one per-tensor scale and
    ``block_m=1, block_k=K`` one scale per row (used by the benchmark's recipe comparison).
    """
    fmt = ScaleFormat.parse(scale_format)
    _check_input(x, arg, min_dim=2)
    if block_m < 1 or block_k < 1:
        raise ValueError(f"{block_m=} and {block_k=} must be >= 1")
    *lead, m, k = x.shape
    mb, kb = ceil_div(m, block_m), ceil_div(k, block_k)
    batch = math.prod(lead)
    xf = x.reshape(batch, m, k).float()
    pad_m, pad_k = mb * block_m - m, kb * block_k - k
    padded = F.pad(xf, (0, pad_k, 0, pad_m)) if pad_m or pad_k else xf  # zeros never change a block's amax
    blocks = padded.view(batch, mb, block_m, kb, block_k)
    # max |x| per block without materialising |x|; NaN propagates, so one check covers NaN and inf
    amax = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=(2, 4), keepdim=True)
    if check_finite and not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{arg} has {bad} non-finite values (NaN or inf) of {x.numel()}; FP8 quantization needs finite "
            "input (check_finite=False skips this check)"
        )
    scale = amax.clamp_min(AMAX_FLOOR) / E4M3_MAX
    if fmt != ScaleFormat.FP32:
        scale = pow2_ceil(scale)
    q = (blocks / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    q = q.view(batch, mb * block_m, kb * block_k)[:, :m, :k].reshape(*lead, m, k).contiguous()
    return q, scale.reshape(*lead, mb, kb)


def quantize_1x128(
    x: torch.Tensor,
    *,
    scale_format: ScaleFormat | str = ScaleFormat.FP32,
    check_finite: bool = True,
    arg: str = "x",
) -> FP8Tensor:
    """Per-token quantization of activations: one scale per 128 consecutive elements of the last dim.

    x: (..., K) float32 / bfloat16 / float16, any K >= 1.
    Returns FP8Tensor(block=(1, 128)): data (..., K) e4m3, scale (..., ceil(K/128)) float32.
    On CUDA tensors with the extension built this runs the csrc/fp8 kernel
    (``frugal_fp8::quant_per_token_1x128``, bit-identical to this reference); otherwise the reference.
    ``check_finite`` raises ValueError on NaN/inf (one device sync; pass False to skip it in hot loops
    that already guarantee finite input).
    ``arg`` names the tensor in error messages.
    """
    fmt = ScaleFormat.parse(scale_format)
    _check_input(x, arg, min_dim=1)
    if x.is_cuda:
        from fp8._ext import has_extension

        if has_extension("fp8"):
            from fp8.cuda_quant_ops import quant_per_token_1x128_cuda

            return quant_per_token_1x128_cuda(x, fmt, check_finite=check_finite, arg=arg)
    q, scale = quantize_blockwise(
        x.reshape(1, -1, x.shape[-1]), 1, BLOCK, scale_format=fmt, check_finite=check_finite, arg=arg
    )
    k = x.shape[-1]
    return FP8Tensor(q.view(x.shape), scale.view(*x.shape[:-1], ceil_div(k, BLOCK)), (1, BLOCK), fmt)


def quantize_128x128(
    w: torch.Tensor,
    *,
    scale_format: ScaleFormat | str = ScaleFormat.FP32,
    check_finite: bool = True,
    arg: str = "w",
) -> FP8Tensor:
    """Per-block quantization of weights: one scale per 128x128 block of the last two dims.

    w: (..., N, K) float32 / bfloat16 / float16 (e.g. (N, K), or (G, N, K) for G experts).
    Returns FP8Tensor(block=(128, 128)): data (..., N, K), scale (..., ceil(N/128), ceil(K/128)).
    On a Hopper GPU with the extension built this runs the csrc/fp8 kernel (bit-identical).
    """
    fmt = ScaleFormat.parse(scale_format)
    _check_input(w, arg, min_dim=2)
    if _sm90_kernels(w):
        from fp8.cuda_quant_ops import quantize_128x128_cuda

        return quantize_128x128_cuda(w, fmt, check_finite=check_finite, arg=arg)
    q, scale = quantize_blockwise(w, BLOCK, BLOCK, scale_format=fmt, check_finite=check_finite, arg=arg)
    return FP8Tensor(q, scale, (BLOCK, BLOCK), fmt)


def quantize_128x1(
    x: torch.Tensor,
    *,
    scale_format: ScaleFormat | str = ScaleFormat.FP32,
    check_finite: bool = True,
    arg: str = "x",
) -> FP8Tensor:
    """Quantization along the token dim for the weight-grad GEMM: one scale per 128 rows of each column.

    x: (..., M, K) float32 / bfloat16 / float16 with M the token dim (the GEMM's contraction dim).
    Returns FP8Tensor(block=(128, 1)): data (..., M, K), scale (..., ceil(M/128), K).
    On a Hopper GPU with the extension built this runs the csrc/fp8 kernel (bit-identical); a 2-D result's
    data is then a transposed view (token-contiguous storage, what the weight-grad kernel reads).
    """
    fmt = ScaleFormat.parse(scale_format)
    _check_input(x, arg, min_dim=2)
    if _sm90_kernels(x):
        from fp8.cuda_quant_ops import quantize_128x1_cuda

        return quantize_128x1_cuda(x, fmt, check_finite=check_finite, arg=arg)
    q, scale = quantize_blockwise(x, BLOCK, 1, scale_format=fmt, check_finite=check_finite, arg=arg)
    return FP8Tensor(q, scale, (BLOCK, 1), fmt)


def _sm90_kernels(x: torch.Tensor) -> bool:
    """Whether csrc/fp8's sm_90a kernels can quantize ``x``: a CUDA tensor on Hopper, extension built."""
    if not x.is_cuda:
        return False
    from fp8._ext import has_extension

    return has_extension("fp8") and torch.cuda.get_device_capability(x.device) == (9, 0)


def _check_input(x: torch.Tensor, arg: str, *, min_dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{arg}.dtype={x.dtype} must be one of {INPUT_DTYPES} to be quantized to FP8")
    if x.dim() < min_dim:
        raise ValueError(f"{arg}.dim()={x.dim()} must be >= {min_dim} (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise ValueError(f"{arg}.shape={tuple(x.shape)}: the last dim (K) must be >= 1")


def is_power_of_two(scale: torch.Tensor) -> bool:
    """True when every entry is a positive power of two (all mantissa bits zero)."""
    bits = scale.contiguous().view(torch.int32)
    return bool(((bits & 0x007FFFFF) == 0).all() and (scale > 0).all())


__all__ = [
    "AMAX_FLOOR",
    "BLOCK",
    "E4M3_MAX",
    "FP8Tensor",
    "ScaleFormat",
    "ceil_div",
    "expand_scale",
    "is_power_of_two",
    "pow2_ceil",
    "quantize_128x1",
    "quantize_128x128",
    "quantize_1x128",
    "quantize_blockwise",
    "scale_from_ue8m0",
    "scale_shape",
]

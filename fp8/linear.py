"""FP8Linear: an ``nn.Linear`` whose three GEMMs (fprop, dgrad, wgrad) run in FP8 with fine-grained scales.

For x (..., K) flattened to (M, K), weight W (N, K) and output grad dy (M, N):

    fprop  y  = x @ W.T (+ bias)   x quantized 1x128 (per token along K), W per 128x128 block
    dgrad  dx = dy @ W             dy quantized 1x128 (per token along N); the 128x128 blocks of W are
                                   the blocks of W.T: the forward's FP8 weight is reused transposed
    wgrad  dW = dy.T @ x           dy and x quantized per 128 tokens (block (128, 1)): the contraction is over
                                   tokens, so the scales must be constant along it
    dbias     = dy.sum(0)          in FP32

For backward the layer saves the FP8 copies (x in its (128, 1) form, W in its 128x128 form) and their
FP32 scales: no high-precision copy of the input is kept, as in DeepSeek-V3's "cached activations in FP8".
Master weights keep their dtype (float32 or bfloat16); the GEMMs accumulate in FP32 and the result is
returned in the input's dtype. Any in/out features (tails are padded inside the GEMMs).

Non-finite values: by default the layer does not check (no device sync per layer); NaN/inf in an
activation block turn that block's outputs into NaN, which propagates like any overflow would (loss
scalers see it). ``check_finite=True`` raises ValueError in forward instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from fp8.gemm import gemm, gemm_wgrad
from fp8.quant import (
    BLOCK,
    FP8Tensor,
    ScaleFormat,
    _sm90_kernels,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scale_format: ScaleFormat,
        check_finite: bool,
        backend: str | None,
        save_for_dgrad: bool,
        save_for_wgrad: bool,
    ) -> torch.Tensor:
        in_shape = x.shape
        x2 = x.reshape(-1, in_shape[-1])
        xt = None
        if save_for_wgrad:  # both operand forms of x in one pass (one kernel on Hopper)
            xq, xt = _quantize_1x128_and_128x1(x2, scale_format, check_finite, "x")
        else:
            xq = quantize_1x128(x2, scale_format=scale_format, check_finite=check_finite)
        wq = quantize_128x128(weight, scale_format=scale_format, check_finite=check_finite, arg="weight")
        if bias is None:
            y = gemm(xq, wq, out_dtype=x.dtype, backend=backend)
        else:  # bias added to the FP32 result before the single rounding to the output dtype
            y = gemm(xq, wq, out_dtype=torch.float32, backend=backend).add_(bias.float()).to(x.dtype)
        saved: list[torch.Tensor] = []
        if save_for_dgrad:
            saved += [wq.data, wq.scale]
        if xt is not None:
            saved += [xt.data, xt.scale]
        ctx.save_for_backward(*saved)
        ctx.meta = (in_shape, x.dtype, weight.dtype, scale_format, backend, save_for_dgrad, save_for_wgrad)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*in_shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        in_shape, x_dtype, w_dtype, fmt, backend, has_w, has_x = ctx.meta
        saved = list(ctx.saved_tensors)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        need_dx, need_dw = ctx.needs_input_grad[0] and has_w, ctx.needs_input_grad[1] and has_x
        dyq = dyt = None
        if need_dx and need_dw:  # both operand forms of dy in one pass (one kernel on Hopper)
            dyq, dyt = _quantize_1x128_and_128x1(dy2, fmt, False, "dy")
        if need_dx:
            w_t = FP8Tensor(saved[0], saved[1], (BLOCK, BLOCK), fmt).t()  # (K, N) blocks of W.T
            if dyq is None:
                dyq = quantize_1x128(dy2, scale_format=fmt, check_finite=False, arg="dy")
            dx = gemm(dyq, w_t, out_dtype=x_dtype, backend=backend).view(in_shape)
        if need_dw:
            xt = FP8Tensor(saved[-2], saved[-1], (BLOCK, 1), fmt)
            if dyt is None:
                dyt = quantize_128x1(dy2, scale_format=fmt, check_finite=False, arg="dy")
            dw = gemm_wgrad(dyt, xt, backend=backend).to(w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(dim=0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None


def _quantize_1x128_and_128x1(
    x2: torch.Tensor, fmt: ScaleFormat, check_finite: bool, arg: str
) -> tuple[FP8Tensor, FP8Tensor]:
    """x2 (M, K) quantized 1x128 (GEMM operand) and 128x1 (weight-grad operand): one fused pass of the
    csrc/fp8 kernel on Hopper with the extension built, else the two quantizers."""
    if _sm90_kernels(x2):
        from fp8.cuda_quant_ops import quantize_1x128_128x1_cuda

        return quantize_1x128_128x1_cuda(x2, fmt, check_finite=check_finite, arg=arg)
    xq = quantize_1x128(x2, scale_format=fmt, check_finite=check_finite, arg=arg)
    return xq, quantize_128x1(x2, scale_format=fmt, check_finite=False, arg=arg)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale_format: ScaleFormat | str = ScaleFormat.FP32,
    check_finite: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Functional FP8 linear: ``x @ weight.T + bias`` with FP8 fprop/dgrad/wgrad (see the module docstring).

    x: (..., K) float32 / bfloat16 / float16; weight: (N, K); bias: (N,) or None. Returns (..., N) in x.dtype.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)}: last dim must equal in_features={weight.shape[1]}")
    grad = torch.is_grad_enabled()
    return _FP8LinearFunction.apply(
        x,
        weight,
        bias,
        ScaleFormat.parse(scale_format),
        check_finite,
        backend,
        grad and x.requires_grad,
        grad and weight.requires_grad,
    )


class FP8Linear(nn.Linear):
    """Drop-in for ``nn.Linear`` with FP8 fprop, dgrad and wgrad (1x128 / 128x128 / 128x1 scales).

    Same parameters, state_dict and initialisation as nn.Linear (it is one); extra keyword arguments:
    scale_format ("fp32" | "pow2" | "ue8m0"), check_finite (raise on NaN/inf input, costs a sync),
    backend (force "cuda" / "torch" / "reference" for its GEMMs).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        scale_format: ScaleFormat | str = ScaleFormat.FP32,
        check_finite: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale_format = ScaleFormat.parse(scale_format)
        self.check_finite = check_finite
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameters (same Parameter objects: optimizers keep working)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x,
            self.weight,
            self.bias,
            scale_format=self.scale_format,
            check_finite=self.check_finite,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=1x128/128x128, scale_format={self.scale_format.value}"


# --- converting a model -----------------------------------------------------------------------------------

HEAD_NAMES = ("head", "output")  # a leaf named "output", or ending in "head" (head, lm_head, mtp_head)
ROUTER_NAMES = (
    "gate",
    "router",
)  # a leaf named exactly "gate" (Mixtral / DeepSeek MoE routers) or "*router*"


def is_high_precision_linear(name: str, module: nn.Linear, tied: set[int]) -> bool:
    """The default rule of :func:`convert_to_fp8` for Linears that stay high precision (DeepSeek-V3 keeps
    embedding, output head and MoE gating in BF16/FP32):

    * the output head: the last name component is ``output`` or ends with ``head`` (``head``, ``lm_head``);
    * a Linear whose weight is tied to an embedding's weight (the same Parameter);
    * a router gate: the last name component is exactly ``gate`` or contains ``router``. SwiGLU gates are
      ordinary projections and are converted: ``gate_proj``, ``w_gate``, ``gate_up_proj``.
    Embeddings are not Linears and are never touched.
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf == "output" or leaf.endswith("head"):
        return True
    if leaf == "gate" or "router" in leaf:
        return True
    return id(module.weight) in tied


def convert_to_fp8(
    model: nn.Module,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
    **fp8_kwargs,
) -> nn.Module:
    """Replace, in place, the ``nn.Linear``s of ``model`` by :class:`FP8Linear` sharing their parameters.

    filter_fn(fully_qualified_name, linear) -> True to convert. Default: every Linear except those
    :func:`is_high_precision_linear` names (output head, weights tied to an embedding, router gates).
    fp8_kwargs go to FP8Linear (scale_format, check_finite, backend). Returns ``model``.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if filter_fn is None:

        def filter_fn(name: str, module: nn.Linear) -> bool:
            return not is_high_precision_linear(name, module, tied)

    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name and filter_fn(name, m)  # exact type: subclasses may mean more
    ]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(m, **fp8_kwargs))
    return model

"""How the tracer classifies torch functions and modules by name (tables), and small helpers."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

_ELEMENTWISE = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "dropout", "elu", "selu", "celu", "leaky_relu", "softplus",
    "mish", "hardswish", "hardsigmoid", "hardtanh", "relu6", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "square", "clone", "contiguous", "float", "double", "half", "bfloat16", "detach", "long", "int", "bool",
    "zeros_like", "ones_like", "empty_like", "full_like", "sin", "cos", "erf", "clamp", "clamp_min", "clamp_max", "pow",
    "reciprocal", "sign", "add", "sub", "rsub", "mul", "div", "true_divide", "truediv", "rtruediv",
    "floordiv", "maximum", "minimum", "where", "masked_fill", "pos", "invert", "logical_not", "eq", "ne",
    "lt", "le", "gt", "ge", "and", "or", "xor", "logical_and", "logical_or", "alpha_dropout", "nan_to_num",
    "addcmul", "addcdiv", "lerp", "sigmoid_", "tanh_", "relu_", "log_sigmoid", "logsigmoid", "softsign",
    "tanhshrink", "glu_", "requires_grad_", "exp2", "expm1", "log1p", "trunc", "round", "floor", "ceil",
}
_FIRST_ONLY = {"to", "type_as", "type", "cuda", "cpu"}          # later tensor arguments give only a dtype/device
_EQUIVARIANT = {"softmax", "log_softmax", "softmin"}         # permuting the axis permutes the result
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean"}
_INDEXED = {"max", "min"}                                     # with a dim: values and indices
_ARG = {"argmax", "argmin", "argsort", "sort", "topk", "cumsum", "cumprod", "flip", "roll", "diff"}
_TRI = {"triu", "tril"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"}
_REORDER = {"transpose", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis", "mT", "T"}
_CREATE = {"zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn", "randint", "tensor",
           "as_tensor", "eye", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "randperm",
           "ones_like_", "scalar_tensor"}
_META = {"size", "dim", "numel", "shape", "dtype", "device", "__len__", "is_floating_point", "item", "tolist",
         "is_contiguous", "stride", "data_ptr", "element_size", "requires_grad", "__bool__", "__float__",
         "__int__", "__index__", "__format__", "__repr__", "__hash__", "ndim", "is_cuda", "get_device",
         "nelement", "__reduce_ex__", "storage_offset", "layout", "names", "_version", "grad_fn", "is_leaf",
         "data", "untyped_storage", "__array__", "numpy", "grad"}

_ACT_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.PReLU,
                nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LEAVES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.Flatten, nn.Softmax, nn.LogSoftmax,
           *_CONV, *_CONVT, *_BN, *_ACT_MODULES, *_PASS_MODULES, *_POOL_MODULES)
_POOL_FUNCS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
               "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "lp_pool1d", "lp_pool2d"}
_MIX_FUNCS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "matmul", "mm",
              "bmm", "scaled_dot_product_attention", "embedding", "baddbmm", "addmm"}


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # a property such as Tensor.shape / Tensor.mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("r") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "matmul", "pow",
                                                 "and", "or", "xor"):
            name = name[1:] if name != "rsub" else "rsub"
        elif name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "and", "or",
                                                   "xor", "pow"):
            name = name[1:]
    if name.endswith("_") and not name.startswith("_") and name[:-1] in (_ELEMENTWISE | _REORDER | _RESHAPE):
        name = name[:-1]
    return name


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d

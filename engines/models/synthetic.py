"""Real ArcFace architectures with seeded weights, written as ONNX, for offline work.

Tests, demos and benchmarks cannot download trained weights here, but they
need the real compute graph: the same operators, shapes and MAC counts as
``w600k_r50`` / ``glintr100`` / ``w600k_mbf``, so that speed, precision drift
and engine builds behave as they will on real models.

Architectures follow ``arcface_torch`` exactly: IResNet (IBasicBlock: BN ->
conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus identity/downsample;
layers 3-4-14-3 for R50 and 3-13-30-3 for R100; BN2d -> flatten -> FC ->
BN1d head) and MobileFaceNet (``get_mbf``: blocks 1-4-6-2, scale 2, GDC head).
One more, ``probe``, is no face model at all: the ArcFace input and output around
next to no compute, to measure the shells alone (see ``_probe``).
The graph is what ``torch.onnx.export`` of those modules in eval mode gives:
conv->BN pairs folded into the conv, BNs that precede a conv kept as
``BatchNormalization``, dynamic batch axis.

Weights: random convolutions, then every BatchNorm is calibrated on a fixed
calibration batch (data-dependent init, as LSUV does) so activations stay
well scaled through 100 layers, the way a trained network's do; without that,
precision drift measured on these models would say nothing about real ones.
The calibration runs in float64 numpy and statistics are rounded to 11
significant bits before use, so the same seed gives the same bytes (and
sha256) on any CPU and BLAS.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..base.contract import PROBE_NOTE

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "input.1"
OUTPUT_NAME = "embedding"
BN_EPS = 1e-5

ARCHITECTURES = {
    "iresnet50": {"family": "iresnet", "layers": (3, 4, 14, 3)},
    "iresnet100": {"family": "iresnet", "layers": (3, 13, 30, 3)},
    "mobilefacenet": {"family": "mbf", "blocks": (1, 4, 6, 2), "scale": 2},
    # Not a face model: the zero-cost probe (see ``_probe``).
    "probe": {"family": "probe", "pool": 16},
}
PROBE_ARCH = "probe"
DEFAULT_SEED = 0


def _stable(x: np.ndarray) -> np.ndarray:
    """Round float64 values to 11 significant bits so BLAS-order noise cannot leak
    into the weights (see module docstring)."""
    mant, exp = np.frexp(x)
    return np.ldexp(np.round(mant * 2048.0) / 2048.0, exp)


def _conv2d(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int) -> np.ndarray:
    """float64 NCHW convolution by im2col + BLAS (calibration only, never served)."""
    n, c, _, _ = x.shape
    out_c, in_per_group, kh, kw = w.shape
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # (n, c, ho, wo, kh, kw)
    ho, wo = windows.shape[2], windows.shape[3]
    if groups == 1:
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
        y = cols @ w.reshape(out_c, -1).T
        return y.reshape(n, ho, wo, out_c).transpose(0, 3, 1, 2)
    out_per_group = out_c // groups
    if in_per_group == 1 and out_per_group == 1:  # depthwise
        return np.einsum("nchwij,cij->nchw", windows, w[:, 0], optimize=True)
    y = np.empty((n, out_c, ho, wo))
    for g in range(groups):
        xs = windows[:, g * in_per_group : (g + 1) * in_per_group]
        ws = w[g * out_per_group : (g + 1) * out_per_group]
        cols = xs.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1)
        yg = cols @ ws.reshape(out_per_group, -1).T
        y[:, g * out_per_group : (g + 1) * out_per_group] = yg.reshape(
            n, ho, wo, out_per_group
        ).transpose(0, 3, 1, 2)
    return y


@dataclass
class _Tensor:
    name: str
    value: np.ndarray  # float64 activations of the calibration batch


@dataclass
class _Builder:
    """Emits ONNX nodes and runs the same op on the calibration batch as it goes."""

    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    macs: int = 0
    counter: int = 0

    def _name(self, op: str) -> str:
        self.counter += 1
        return f"{op}_{self.counter}"

    def _init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def _node(self, op: str, inputs: list[str], **attrs: object) -> str:
        from onnx import helper

        name = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def _bn_params(self, y: np.ndarray, axes: tuple[int, ...], gamma: float, beta_std: float):
        channels = y.shape[1]
        mean = _stable(y.mean(axis=axes))
        var = _stable(y.var(axis=axes))
        weight = gamma * self.rng.uniform(0.8, 1.2, channels)
        bias = beta_std * self.rng.standard_normal(channels)
        return mean, var, weight, bias

    def conv_bn(
        self,
        x: _Tensor,
        out_c: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        gamma: float = 1.0,
        pad: int | None = None,
    ) -> _Tensor:
        """Conv2d(bias=False) + BatchNorm2d, folded into one Conv as torch's export does."""
        in_c = x.value.shape[1]
        fan_in = (in_c // groups) * k * k
        w = self.rng.standard_normal((out_c, in_c // groups, k, k)) / math.sqrt(fan_in)
        pad = k // 2 if pad is None else pad
        y = _conv2d(x.value, w, stride, pad, groups)
        mean, var, weight, bias = self._bn_params(y, (0, 2, 3), gamma, 0.05 * gamma)
        scale = weight / np.sqrt(var + BN_EPS)
        w_fold = w * scale[:, None, None, None]
        b_fold = bias - mean * scale
        y = y * scale[None, :, None, None] + b_fold[None, :, None, None]
        self.macs += out_c * y.shape[2] * y.shape[3] * fan_in
        name = self._name("conv")
        out = self._node(
            "Conv",
            [x.name, self._init(f"{name}.weight", w_fold), self._init(f"{name}.bias", b_fold)],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=groups,
            dilations=[1, 1],
        )
        return _Tensor(out, y)

    def batchnorm(self, x: _Tensor, gamma: float = 1.0, fixed_weight: bool = False) -> _Tensor:
        axes = (0,) if x.value.ndim == 2 else (0, 2, 3)
        mean, var, weight, bias = self._bn_params(x.value, axes, gamma, 0.05)
        if fixed_weight:  # arcface_torch freezes the features BN1d weight at 1
            weight = np.ones_like(weight)
        shape = (1, -1) if x.value.ndim == 2 else (1, -1, 1, 1)
        y = (x.value - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + BN_EPS)
        y = y * weight.reshape(shape) + bias.reshape(shape)
        name = self._name("bn")
        out = self._node(
            "BatchNormalization",
            [
                x.name,
                self._init(f"{name}.weight", weight),
                self._init(f"{name}.bias", bias),
                self._init(f"{name}.running_mean", mean),
                self._init(f"{name}.running_var", var),
            ],
            epsilon=BN_EPS,
        )
        return _Tensor(out, y)

    def prelu(self, x: _Tensor) -> _Tensor:
        channels = x.value.shape[1]
        slope = self.rng.uniform(0.1, 0.4, channels)
        y = np.where(x.value >= 0, x.value, x.value * slope[None, :, None, None])
        name = self._name("prelu")
        out = self._node("PRelu", [x.name, self._init(f"{name}.slope", slope[:, None, None])])
        return _Tensor(out, y)

    def add(self, a: _Tensor, b: _Tensor) -> _Tensor:
        return _Tensor(self._node("Add", [a.name, b.name]), a.value + b.value)

    def flatten(self, x: _Tensor) -> _Tensor:
        y = x.value.reshape(x.value.shape[0], -1)
        return _Tensor(self._node("Flatten", [x.name], axis=1), y)

    def avgpool(self, x: _Tensor, k: int) -> _Tensor:
        n, c, h, w = x.value.shape
        y = x.value.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))
        return _Tensor(self._node("AveragePool", [x.name], kernel_shape=[k, k], strides=[k, k]), y)

    def linear(self, x: _Tensor, out_features: int, bias: bool) -> _Tensor:
        in_features = x.value.shape[1]
        w = self.rng.standard_normal((out_features, in_features)) / math.sqrt(in_features)
        b = np.zeros(out_features)
        self.macs += in_features * out_features
        name = self._name("fc")
        inputs = [x.name, self._init(f"{name}.weight", w)]
        if bias:
            inputs.append(self._init(f"{name}.bias", b))
        out = self._node("Gemm", inputs, alpha=1.0, beta=1.0, transB=1)
        return _Tensor(out, x.value @ w.T + b)


def _iresnet(b: _Builder, x: _Tensor, layers: tuple[int, ...]) -> _Tensor:
    x = b.prelu(b.conv_bn(x, 64, 3))
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers, strict=True):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            branch = b.batchnorm(x)
            branch = b.prelu(b.conv_bn(branch, planes, 3))
            # The residual branch's last BN scale sets how fast the identity
            # stream grows; 0.5 keeps R100's 30-block stage well conditioned.
            branch = b.conv_bn(branch, planes, 3, stride=stride, gamma=0.5)
            identity = b.conv_bn(x, planes, 1, stride=stride) if i == 0 else x
            x = b.add(branch, identity)
            inplanes = planes
    assert inplanes == 512
    x = b.flatten(b.batchnorm(x))
    x = b.linear(x, 512, bias=True)
    return b.batchnorm(x, fixed_weight=True)


def _mbf(b: _Builder, x: _Tensor, blocks: tuple[int, ...], scale: int) -> _Tensor:
    def conv_block(t: _Tensor, out_c: int, k: int, stride: int = 1, groups: int = 1) -> _Tensor:
        return b.prelu(b.conv_bn(t, out_c, k, stride, groups))

    def depthwise(t: _Tensor, out_c: int, stride: int, groups: int, residual: bool) -> _Tensor:
        y = conv_block(t, groups, 1)
        y = conv_block(y, groups, 3, stride, groups)
        y = b.conv_bn(y, out_c, 1, gamma=0.5 if residual else 1.0)
        return b.add(t, y) if residual else y

    def residual(t: _Tensor, c: int, num_block: int, groups: int) -> _Tensor:
        for _ in range(num_block):
            t = depthwise(t, c, 1, groups, True)
        return t

    c64, c128 = 64 * scale, 128 * scale
    x = conv_block(x, c64, 3, stride=2)
    if blocks[0] == 1:
        x = conv_block(x, c64, 3, groups=64)
    else:
        x = residual(x, c64, blocks[0], 128)
    x = depthwise(x, c64, 2, 128, False)
    x = residual(x, c64, blocks[1], 128)
    x = depthwise(x, c128, 2, 256, False)
    x = residual(x, c128, blocks[2], 256)
    x = depthwise(x, c128, 2, 512, False)
    x = residual(x, c128, blocks[3], 256)
    x = conv_block(x, 512, 1)
    x = b.conv_bn(x, 512, 7, groups=512, pad=0)  # GDC: 7x7 depthwise "linear block"
    x = b.flatten(x)
    x = b.linear(x, 512, bias=False)
    return b.batchnorm(x)


def _probe(b: _Builder, x: _Tensor, pool: int) -> _Tensor:
    """The zero-cost probe: the ArcFace input and output around next to no compute.

    Triton measures its own overhead with an identity model under perf_analyzer; this is
    that for us: a real ONNX graph the real backends run (so every byte the shells move
    and every call they make is the same as for a face model), costing about 75k MACs per
    face instead of 6.3G (IResNet-50). Pooling to 3x7x7 keeps the rows distinct, so
    batching or ordering mistakes still show in the vectors.
    """
    return b.linear(b.flatten(b.avgpool(x, pool)), 512, bias=True)


def calibration_batch(seed: int) -> np.ndarray:
    """Normalised NCHW float64 inputs the BatchNorms are calibrated on.

    A real face (the aligned crop insightface ships, decoded from PNG, which is
    lossless, so identical everywhere) in integer-exact variants, plus seeded
    smooth noise so the statistics are not those of one face alone.
    """
    from .sample_faces import load_tom_hanks

    face = load_tom_hanks().astype(np.int32)
    variants = [face, face[:, ::-1], np.clip(face * 3 // 4 + 16, 0, 255)]
    variants.append(np.clip(np.roll(face, 3, axis=0) * 5 // 4, 0, 255))
    rng = np.random.default_rng(seed + 7919)
    for _ in range(4):
        coarse = rng.integers(0, 256, (14, 14, 3))
        variants.append(np.kron(coarse, np.ones((8, 8, 1), dtype=np.int64)))
    bgr = np.stack(variants).astype(np.float64)
    rgb = bgr[..., ::-1].transpose(0, 3, 1, 2)
    return (rgb - 127.5) / 127.5


@dataclass(frozen=True)
class SyntheticModel:
    arch: str
    seed: int
    path: Path
    macs_per_face: int


def build_synthetic_onnx(arch: str, seed: int = DEFAULT_SEED):
    """Build the ONNX ``ModelProto`` of ``arch`` with weights drawn from ``seed``.

    Returns ``(model, macs_per_face)``.
    """
    from onnx import TensorProto, checker, helper

    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown synthetic architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    spec = ARCHITECTURES[arch]
    builder = _Builder(rng=np.random.default_rng([seed, GENERATOR_VERSION]))
    x = _Tensor(INPUT_NAME, calibration_batch(seed))
    if spec["family"] == "iresnet":
        y = _iresnet(builder, x, spec["layers"])
    elif spec["family"] == "probe":
        y = _probe(builder, x, spec["pool"])
    else:
        y = _mbf(builder, x, spec["blocks"], spec["scale"])
    builder.nodes[-1].output[0] = OUTPUT_NAME
    graph = helper.make_graph(
        builder.nodes,
        f"synthetic_{arch}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 512])],
        initializer=builder.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="arcface-ray.synthetic",
        producer_version=str(GENERATOR_VERSION),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    helper.set_model_props(
        model,
        {
            "arcface_ray.synthetic": "true",
            "arcface_ray.arch": arch,
            "arcface_ray.seed": str(seed),
            "arcface_ray.generator_version": str(GENERATOR_VERSION),
            "arcface_ray.macs_per_face": str(builder.macs),
            "arcface_ray.note": PROBE_NOTE if arch == PROBE_ARCH
            else "seeded random weights, NOT a trained face model",
        },
    )
    checker.check_model(model)
    logger.debug("built synthetic %s: %d nodes, %.3f GMAC/face", arch, len(builder.nodes), builder.macs / 1e9)
    return model, builder.macs, y


def write_synthetic_model(arch: str, path: Path, seed: int = DEFAULT_SEED) -> SyntheticModel:
    """Generate ``arch`` and write it to ``path`` atomically (temp file + rename)."""
    import onnx

    model, macs, _ = build_synthetic_onnx(arch, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return SyntheticModel(arch=arch, seed=seed, path=path, macs_per_face=macs)

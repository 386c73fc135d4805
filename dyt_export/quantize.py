"""Opt-in int8 export: ONNX Runtime static (default) or dynamic quantization of a dyt-export
fp32 graph. Both quantize the same GEMMs and keep the same parts float, as listed below; the
dynamic form scales activations on every call instead of from calibration images
(`config.INT8_ACTIVATIONS` says when each pays), and its weights are per tensor.

What is quantized, and why:
* the weight GEMMs (MatMul/Gemm with a constant weight: qkv, attention projection, MLP,
  adapters, head): int8 weights per output channel (symmetric), uint8 activations per tensor
  (asymmetric), the u8 x s8 form ONNX Runtime runs natively with VNNI on x86. Measured on
  ViT-B/16 (2 cores, Zen 4): u8 activations 1.76x / 1.94x the fp32 DyT export's img/s on ORT
  at batch 1 / 8, symmetric s8 activations only 1.35x / 1.50x (OpenVINO: 2.2-2.9x either
  way); top-1 agreement on the demo model 99.3 % (u8) vs 99.8 % (s8). Activation ranges are
  MinMax: ORT's histogram calibrators (Percentile, Entropy) fail on tensors whose row count
  changes from batch to batch, which the token dispatch makes every gathered tensor do;
* not the attention products of two activations (quantizing them measured no faster);
* not the patch-embedding Conv: OpenVINO 2026.4 runs a QDQ Conv on the input pixels with a
  systematic offset (dispatcher logits shifted by ~0.5, top-1 agreement 97.6 % on the demo
  model), and the Conv is under 1 % of ViT-B/16's MACs;
* **not** the token dispatchers: their logits decide which tokens run, and a threshold on
  a quantized logit moves tokens across it. Every node of a `TokenDispatcher` (found by the
  exporter's `pkg.torch.onnx.class_hierarchy` metadata) stays float and reads the float
  residual stream, never a quantize-dequantize copy of it (`_keep_dispatchers_float`);
* not LayerNorm, GELU, softmax or the residual adds.

The format is QDQ (QuantizeLinear/DequantizeLinear pairs around float ops), which ONNX
Runtime fuses into integer kernels and OpenVINO reads as FakeQuantize, so one int8 file
serves both CPU runtimes. Calibration runs the fp32 graph itself (data-dependent dispatch
and all) over seeded image-like inputs, or over the user's preprocessed images.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .atomic import staged_outputs
from .config import INT8_ACTIVATIONS, check_tome_precision
from .errors import UserError
from .files import check_input_file
from .progress import quiet_logs

QUANTIZED_OPS = ("MatMul", "Gemm")
CALIBRATION_BATCH = 4
DISPATCHER_CLASS = "TokenDispatcher"


@dataclass
class Int8Result:
    path: Path
    int8_weights: int
    float_dispatcher_nodes: int
    calibration_images: int


def _hierarchy(node: Any) -> str:
    return next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.class_hierarchy"), "")


def dispatcher_nodes(model: Any) -> set[str]:
    """Names of the nodes computing token-dispatcher logits and masks."""
    names = {node.name for node in model.graph.node if DISPATCHER_CLASS in _hierarchy(node)}
    thresholds = sum(1 for node in model.graph.node if node.op_type == "Greater" and node.name in names)
    if names and not thresholds:
        raise UserError("int8: found dispatcher nodes but no threshold among them; refusing to guess")
    return names


def weight_nodes(model: Any) -> list[str]:
    """Nodes whose second input is a constant weight (what int8 GEMMs accelerate)."""
    initializers = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type in QUANTIZED_OPS and len(node.input) > 1 and node.input[1] in initializers]


def _batches(images: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(images), CALIBRATION_BATCH):
        yield {"pixel_values": np.ascontiguousarray(images[start:start + CALIBRATION_BATCH], dtype=np.float32)}


def _keep_dispatchers_float(model: Any, dispatchers: set[str]) -> int:
    """Point every dispatcher input that the quantizer routed through QuantizeLinear ->
    DequantizeLinear back at the float tensor; drop Q/DQ nodes nobody reads any more.
    Returns how many inputs were rewired."""
    producer = {out: node for node in model.graph.node for out in node.output}
    rewired = 0
    for node in model.graph.node:
        if node.name not in dispatchers:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    while True:
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in used for out in n.output)]
        if not dead:
            return rewired
        for n in dead:
            model.graph.node.remove(n)


INT8_SINGLE_FILE_ONLY = ("int8 quantization takes models whose fp32 weights fit in the ONNX file (1.8 GB at most), "
                         "not ones kept in external data")


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray | None,
                  activations: str = "static") -> Int8Result:
    """Write the int8 form of the dyt-export fp32 ONNX file `fp32_path` to `out_path`. Static
    activations are calibrated on `calibration` [N, C, H, W] float32 (already normalised model
    inputs); dynamic ones take no calibration (`calibration` None)."""
    import onnx

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if activations not in INT8_ACTIVATIONS:
        raise UserError(f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, not {activations!r}")
    if (activations == "dynamic") != (calibration is None):
        raise UserError("dynamic int8 takes no calibration images" if calibration is not None
                        else "static int8 needs calibration images")
    if fp32_path.with_name(fp32_path.name + ".data").exists():
        raise UserError(INT8_SINGLE_FILE_ONLY)
    if calibration is not None and (calibration.ndim != 4 or len(calibration) == 0):
        raise UserError(f"int8 calibration needs images [N, C, H, W], got shape {list(calibration.shape)}")
    model = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("dyt.precision", "fp32") != "fp32":
        raise UserError(f"int8 quantization starts from an fp32 export, not {props.get('dyt.precision')}")
    dispatchers = dispatcher_nodes(model)
    with tempfile.TemporaryDirectory() as tmp, quiet_logs(""):  # ORT logs advice on the root logger
        staged = Path(tmp) / "int8.onnx"
        if calibration is None:
            _quantize_dynamic(model, dispatchers, staged)
            summary = "ORT dynamic, u8 activations scaled on every call (per tensor), s8 weights per tensor"
        else:
            _quantize_static(fp32_path, model, dispatchers, calibration, staged)
            summary = (f"ORT static QDQ, u8 activations (per tensor, MinMax on {len(calibration)} images), "
                       f"s8 weights per channel")
        quantized = onnx.load(str(staged))
    _keep_dispatchers_float(quantized, dispatchers)
    onnx.helper.set_model_props(quantized, {**props, "dyt.precision": "int8", "dyt.int8_activations": activations,
                                            "dyt.int8": f"{summary}; dispatchers float"})
    onnx.checker.check_model(quantized)
    with staged_outputs(out_path) as stage:  # out_path may be fp32_path: replace it whole or not at all
        onnx.save(quantized, str(stage / out_path.name))
    int8_weights = sum(1 for i in quantized.graph.initializer
                       if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2)
    return Int8Result(out_path, int8_weights, len(dispatchers), 0 if calibration is None else len(calibration))


def _quantize_static(fp32_path: Path, model: Any, dispatchers: set[str], calibration: np.ndarray, out: Path) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        """Batches of the calibration images; ORT asks for them one batch at a time
        (`CalibStridedMinMax` 1) and folds each batch's ranges in before the next, so memory
        holds one batch's intermediate tensors (~2.5 GB for ViT-B/16 at 4 images), not all of them."""

        def __init__(self) -> None:
            self._batches = list(_batches(calibration))
            self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

        def __len__(self) -> int:
            return len(self._batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(self._batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    targets = [name for name in weight_nodes(model) if name not in dispatchers]
    quantize_static(
        str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=targets, nodes_to_exclude=sorted(dispatchers),
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "CalibStridedMinMax": 1,
                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
    )


def _quantize_dynamic(model: Any, dispatchers: set[str], out: Path) -> None:
    """Weights per tensor: per channel measured no faster on ViT-B/16 and further from fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _gemms_as_matmuls(model, keep=dispatchers)
    targets = [name for name in weight_nodes(model) if name not in dispatchers]
    quantize_dynamic(model, str(out), op_types_to_quantize=["MatMul"], nodes_to_quantize=targets,
                     nodes_to_exclude=sorted(dispatchers), per_channel=False, weight_type=QuantType.QInt8)


def _gemms_as_matmuls(model: Any, keep: set[str]) -> int:
    """Rewrite every plain `Gemm` with a constant weight (the gathered MLP rows' linears, the
    head) but the nodes in `keep` as MatMul + Add, in place, since ORT's dynamic quantizer has
    no Gemm: otherwise the DyT export's fc1/fc2 would stay float. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    from .export.graph import drop_unused_initializers

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in keep or len(node.input) < 2 or node.input[1] not in initializers
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(initializers[weight]).T.copy(),
                                                 f"{weight}.T{rewritten}")
            graph.initializer.append(transposed)
            weight = transposed.name
        bias = node.input[2] if len(node.input) > 2 else ""
        product = f"{node.output[0]}.matmul" if bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}.matmul")]
        if bias:
            new.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}.bias"))
        for n in new:
            n.metadata_props.extend(node.metadata_props)
        nodes += new
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)  # the transposed weights' originals
    return rewritten


def load_calibration_file(path: str | Path) -> np.ndarray:
    """Preprocessed images from a .npy file: a finite float array [N, C, H, W], N >= 1, as
    float32. Checked before any export work, so a bad file costs nothing and touches nothing;
    pickled (object) arrays are refused, never unpickled."""
    path = Path(path)
    check_input_file(path, "--calibration-images")
    flag = f"--calibration-images {path}"
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        pickled = "pickle" in str(e).lower() or "object arrays" in str(e).lower()
        reason = "pickled Python objects, refused" if pickled else str(e).splitlines()[0][:120]
        raise UserError(f"{flag} is not a .npy array of images ({reason})") from None
    if not isinstance(images, np.ndarray):  # np.load opens every zip file as an .npz archive
        with images:
            npz = all(name.endswith(".npy") for name in images.zip.namelist())
        kind = "an .npz archive" if npz else "a zip archive, not .npy (a torch.save checkpoint?)"
        raise UserError(f"{flag} is {kind}; save one array [N, C, H, W] with numpy.save")
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"{flag} holds {images.dtype} data; need float images, preprocessed as the model expects")
    if images.ndim != 4 or len(images) == 0:
        raise UserError(f"{flag} has shape {list(images.shape)}; need images [N, C, H, W] with N >= 1")
    if not np.isfinite(images).all():
        raise UserError(f"{flag} holds NaN or infinite values")
    return images.astype(np.float32, copy=False)


def check_calibration_shape(images: np.ndarray, cfg: Any, source: str | Path = "calibration images") -> np.ndarray:
    """`images` if each is [C, H, W] of the model `cfg` describes."""
    want = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if tuple(images.shape[1:]) != want:
        raise UserError(f"{source}: images of shape {list(images.shape[1:])}, the model takes [{', '.join(map(str, want))}]")
    return images


def calibration_images(cfg: Any, count: int = 64, seed: int = 0) -> np.ndarray:
    """`count` seeded image-like inputs for a model `cfg` describes: the calibration set when
    the user gives none (their own images come through `load_calibration_file`)."""
    from .calibrate import image_like

    return image_like(count, size=cfg.img_size, chans=cfg.in_chans, seed=seed).numpy()


def export_int8(model: Any, path: str | Path, calibration: np.ndarray | None, *, activations: str = "static",
                steps: Any = None, **export_options: Any) -> Int8Result:
    """Export `model` in fp32 (`export_onnx` with `export_options`) and write its int8 form to
    `path`. The fp32 graph is an intermediate in a staging directory beside `path`, and only
    the int8 file is moved into place, so a failure at any step leaves `path` as it was."""
    from .export import export_onnx, weights_need_external_data
    from .progress import Steps

    if weights_need_external_data(model):
        raise UserError(INT8_SINGLE_FILE_ONLY)
    check_tome_precision(model.dyt_config, "int8")
    path = Path(path)
    steps = steps or Steps()
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".partial", dir=path.resolve().parent) as tmp:
        fp32 = export_onnx(model, Path(tmp) / path.name, steps=steps, **export_options).path
        with steps.step("int8 quantization"):
            return quantize_int8(fp32, path, calibration, activations)

"""All four dispatch variants x {plain adapter, MoE E=1, MoE E=4}: PyTorch's logits and token
masks on ONNX Runtime (CPU; CUDA where there is one), OpenVINO and the C++ `dyt_infer` (on
ORT and OpenVINO), batch results equal one-by-one results on each, masked and gathered paths
agree, MoE E=1 is the adapter.

Each dispatcher is steered so that some image of the batch of 5 activates exactly 0, 1 or all
patch tokens there while the others differ: the ragged batches the gathered attention must
keep apart, and single-image runs down to CLS alone. Each model is exported once per run
(a file cache that xdist workers take turns on) and shared by every runtime; `dyt_infer`
runs the batch and its five images in one launch per runtime.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from timm.models.vision_transformer import Attention

from dyt_export import build_model, export_onnx
from dyt_export.calibrate import set_dispatcher_biases
from dyt_export.config import VARIANTS, unit_module_names
from dyt_export.export import summarize
from dyt_export.model import DyTVisionTransformer
from dyt_export.model.adapter import MoEAdapter
from dyt_export.model.attention import attention
from dyt_export.model.dispatcher import TokenDispatcher
from dyt_export.model.gather import rowwise_added, sequence_added
from runtimes import get_backend, open_backend

from conftest import image_batch, small_config
from steering import ALL, steer
from test_cpp import dyt_infer  # noqa: F401  (the session's `make cpp`)

TOLERANCE = 1e-5
"""max |diff| <= this x max |logit|: a runtime against PyTorch (measured <= 2.0e-6), a batch
of 5 against its five single-image runs (<= 9.4e-7), masked against gathered. A tenth of
validation's fp32 bound: an error five times the noise measured here fails."""
RUNTIMES = ("ort-cpu", "ort-cuda", "openvino", "cpp-ort", "cpp-openvino")
"""The Python backends by their `runtimes` names (ort-cuda skips, with the reason, where it is
not available); dyt_infer as cpp-<its --runtime>. All at one thread."""
TARGETS = [0, ALL, 1]
"""Active patch tokens some image reaches at each dispatcher, cycling: 3 blocks give every
variant a 0, an all and a 1; attn_mlp's 6 dispatchers get each twice."""
ADAPTERS = {"adapter": 0, "moe1": 1, "moe4": 4}
CASES = [(variant, name) for variant in VARIANTS for name in ADAPTERS]


def _images() -> torch.Tensor:
    return torch.from_numpy(image_batch(5, seed=3))


def steered_model(variant: str, experts: int) -> DyTVisionTransformer:
    model = build_model(small_config(variant=variant, experts=experts), seed=0)
    steer(model, _images(), TARGETS)
    return model


def _relative(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


Output = tuple[np.ndarray, np.ndarray]
"""logits [B, classes], token masks [B, dispatchers, tokens]"""


@dataclass
class Runs:
    """One runtime's answers for the batch and for each of its images alone."""

    batch: Output
    singles: list[Output]


def _torch_runs(model: DyTVisionTransformer, images: torch.Tensor) -> Runs:
    traces = [model.trace(x) for x in [images] + [images[i:i + 1] for i in range(len(images))]]
    outs = [(t.logits.numpy(), t.masks.numpy()) for t in traces]
    return Runs(outs[0], outs[1:])


def _python_runs(runtime: str, path: Path, images: np.ndarray) -> Runs:
    available = get_backend(runtime).availability()
    if not available:
        pytest.skip(f"{runtime} is not available here: {available.reason}")
    backend = open_backend(runtime, path, threads=1)

    def run(x: np.ndarray) -> Output:
        out = backend.run({"pixel_values": x})
        return out["logits"], out["token_masks"]
    return Runs(run(images), [run(images[i:i + 1]) for i in range(len(images))])


def _cpp_runs(dyt_infer: Path, runtime: str, path: Path, images: np.ndarray, folder: Path) -> Runs:
    """The batch and each image alone as --input/--output pairs of one dyt_infer launch."""
    folder.mkdir(exist_ok=True)
    inputs = [images] + [images[i:i + 1] for i in range(len(images))]
    pairs = []
    for i, x in enumerate(inputs):
        np.save(folder / f"x{i}.npy", x)
        pairs += ["--input", str(folder / f"x{i}.npy"), "--output", str(folder / f"y{i}.npy")]
    done = subprocess.run([str(dyt_infer), "--runtime", runtime, "--model", str(path), "--threads", "1", *pairs],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outs = [(np.load(folder / f"y{i}.npy"), np.load(folder / f"y{i}.masks.npy")) for i in range(len(inputs))]
    return Runs(outs[0], outs[1:])


@dataclass
class Case:
    model: DyTVisionTransformer
    path: Path
    images: torch.Tensor
    work: Path
    _runs: dict[str, Runs] = field(default_factory=dict)

    def runs(self, runtime: str, request: pytest.FixtureRequest) -> Runs:
        """`runtime`'s answers ("torch": the PyTorch reference), computed once per module."""
        if runtime not in self._runs:
            if runtime == "torch":
                self._runs[runtime] = _torch_runs(self.model, self.images)
            elif runtime.startswith("cpp-"):  # dyt_infer is built (or skipped) only when asked for
                self._runs[runtime] = _cpp_runs(request.getfixturevalue("dyt_infer"), runtime.removeprefix("cpp-"),
                                                self.path, self.images.numpy(), self.work / runtime)
            else:
                self._runs[runtime] = _python_runs(runtime, self.path, self.images.numpy())
        return self._runs[runtime]


def _export_path(folder: Path, variant: str, adapter: str) -> Path:
    return folder / f"{variant}-{adapter}.onnx"


@pytest.fixture(scope="module")
def exports(request, tmp_path_factory, worker_id) -> Path:
    """The folder holding every selected case's export, made once per run for all xdist
    workers. Each worker starts at its own share of the list and passes over a model another
    worker is exporting, so the workers export side by side instead of waiting on each other
    (xdist hands one case's tests to several workers)."""
    root = tmp_path_factory.getbasetemp()
    folder = (root if worker_id == "master" else root.parent) / "variant-exports"
    folder.mkdir(exist_ok=True)
    selected = {item.callspec.params["case"] for item in request.session.items
                if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    pending = [c for c in CASES if c in selected]
    index = 0 if worker_id == "master" else int(worker_id.removeprefix("gw"))
    start = index * len(pending) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    pending = pending[start:] + pending[:start]

    def export(variant: str, adapter: str, timeout: float) -> None:
        path = _export_path(folder, variant, adapter)
        with FileLock(str(path) + ".lock", timeout=timeout):
            if not path.exists():
                export_onnx(steered_model(variant, ADAPTERS[adapter]), path, with_masks=True)
    busy = []
    for variant, adapter in pending:
        try:
            export(variant, adapter, timeout=0)
        except Timeout:  # another worker is exporting it: come back at the end
            busy.append((variant, adapter))
    for variant, adapter in busy:
        export(variant, adapter, timeout=-1)
    return folder


@pytest.fixture(scope="module", params=CASES, ids=[f"{v}-{a}" for v, a in CASES])
def case(request, exports, tmp_path_factory) -> Case:
    variant, adapter = request.param
    return Case(steered_model(variant, ADAPTERS[adapter]), _export_path(exports, variant, adapter), _images(),
                tmp_path_factory.mktemp(f"{variant}-{adapter}"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_steering_produces_the_edge_cases(variant):
    """The construction the other tests rely on: at each dispatcher some image has exactly
    0, 1 or all patch tokens active, and the batch is ragged there."""
    model = steered_model(variant, 0)
    masks = model.trace(_images()).masks[:, :, 1:].sum(dim=2)  # [B, D] active patch tokens
    patches = model.dyt_config.num_patches
    for d in range(masks.shape[1]):
        count = TARGETS[d % len(TARGETS)]
        assert (patches if count == ALL else count) in masks[:, d].tolist(), (d, masks[:, d])
        assert len(set(masks[:, d].tolist())) > 1, f"dispatcher {d}: every image has the same count"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_matches_pytorch_at_batch_5_and_1(case, runtime, request):
    """Token masks exactly and logits to TOLERANCE, for the batch and each image alone
    (among them images whose layer keeps CLS alone, one patch token or all of them)."""
    ref, got = case.runs("torch", request), case.runs(runtime, request)
    for i, ((ref_logits, ref_masks), (logits, masks)) in enumerate(zip([ref.batch] + ref.singles,
                                                                           [got.batch] + got.singles)):
        what = "batch" if i == 0 else f"image {i - 1} alone"
        np.testing.assert_array_equal(masks, ref_masks, err_msg=what)
        assert _relative(logits, ref_logits) <= TOLERANCE, what


@pytest.mark.parametrize("runtime", ("torch", *RUNTIMES))
def test_batch_equals_one_by_one(case, runtime, request):
    """Ragged per-image attention never mixes images, including the single-image runs where a
    layer has only CLS (0 patches) or every token active."""
    runs = case.runs(runtime, request)
    np.testing.assert_array_equal(np.concatenate([m for _, m in runs.singles]), runs.batch[1])
    assert _relative(np.concatenate([l for l, _ in runs.singles]), runs.batch[0]) <= TOLERANCE


def test_graph_skips_tokens_at_every_dispatcher(case):
    """One data-dependent selection and one ScatterND per dispatcher: NonZero for MLP units
    (rows of the whole batch), TopK for attention and layer units (per-image compaction)."""
    names = case.model.dyt_config.dispatcher_names
    ops = summarize(case.path).op_counts
    assert ops.get("NonZero", 0) == sum(n.endswith(".mlp") for n in names)
    assert ops.get("TopK", 0) == sum(not n.endswith(".mlp") for n in names)
    assert ops.get("ScatterND", 0) == len(names) and "ScatterElements" not in ops


OPSET_CASES = [("attn", 0, 17), ("attn", 0, 21), ("attn_mlp", 2, 17), ("attn_mlp", 2, 21), ("layer", 2, 17),
               ("layer", 2, 21)]


@pytest.mark.parametrize("variant,experts,opset", OPSET_CASES, ids=[f"{v}-E{e}-opset{o}" for v, e, o in OPSET_CASES])
def test_attention_variants_at_the_lowest_and_highest_opset(tmp_path, variant, experts, opset):
    """The per-image compaction (ReduceMax of the active counts, TopK) and the MoE router
    (ReduceMean) survive the conversion below torch's opset 18 and the newest opset: the
    file imports the opset asked for and matches PyTorch on ragged batches. Two blocks keep
    the exports short; the default opset is covered by every other test here."""
    model = build_model(small_config(depth=2, variant=variant, experts=experts), seed=0)
    steer(model, _images(), TARGETS)
    path = export_onnx(model, tmp_path / "m.onnx", opset=opset, with_masks=True).path
    assert summarize(path).opset == opset
    backend = open_backend("ort-cpu", path, threads=1)
    for images in (_images(), _images()[:1]):
        ref = model.trace(images)
        out = backend.run({"pixel_values": images.numpy()})
        np.testing.assert_array_equal(out["token_masks"], ref.masks.numpy())
        assert _relative(out["logits"], ref.logits) <= TOLERANCE


@pytest.mark.parametrize("variant,adapter", CASES, ids=[f"{v}-{a}" for v, a in CASES])
def test_masked_and_gathered_paths_agree(variant, adapter):
    model = steered_model(variant, ADAPTERS[adapter])
    masked = model.trace(_images(), "masked")
    gathered = model.trace(_images(), "dynamic")
    assert torch.equal(masked.masks, gathered.masks)
    assert _relative(gathered.logits, masked.logits) <= TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_active_dispatch_equals_dense(variant):
    """A dispatcher that passes every token must be the dense model (adapters included)."""
    model = build_model(small_config(variant=variant, experts=4), seed=0)
    set_dispatcher_biases(model, _images(), lambda d, raw: float(raw.abs().max()) + 1.0)
    for mode in ("masked", "dynamic"):
        assert _relative(model.trace(_images(), mode).logits, model.trace(_images(), "dense").logits) <= TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_with_one_expert_is_the_plain_adapter(variant):
    plain = build_model(small_config(variant=variant, adapter_scale=1.0), seed=0)
    moe = build_model(small_config(variant=variant, adapter_scale=1.0, experts=1), seed=1)
    state = {k: v for k, v in plain.state_dict().items() if ".adapt" not in k}
    moe.load_state_dict(state, strict=False)
    for block_plain, block_moe in zip(plain.blocks, moe.blocks):
        for unit in plain.dyt_config.units:
            name = unit_module_names(unit)[0]
            adapter, expert = getattr(block_plain, name), getattr(block_moe, name)
            assert isinstance(expert, MoEAdapter) and expert.experts == 1
            with torch.no_grad():
                expert.down_weight.copy_(adapter.down_proj.weight[None])
                expert.down_bias.copy_(adapter.down_proj.bias[None])
                expert.up_weight.copy_(adapter.up_proj.weight[None])
                expert.up_bias.copy_(adapter.up_proj.bias[None])
    steer(plain, _images(), TARGETS)
    steer(moe, _images(), TARGETS)  # same weights, so the same biases
    for mode in ("dynamic", "masked"):
        ref, out = plain.trace(_images(), mode), moe.trace(_images(), mode)
        assert torch.equal(ref.masks, out.masks)
        assert _relative(out.logits, ref.logits) <= TOLERANCE


def _edge_masks(n: int) -> torch.Tensor:
    """Rows: CLS only, everything, CLS + last token, a scattered half."""
    masks = torch.zeros(4, n, dtype=torch.bool)
    masks[:, 0] = True
    masks[1] = True
    masks[2, -1] = True
    masks[3, ::2] = True
    return masks


def test_sequence_added_is_attention_over_each_images_active_tokens():
    """Against an independent oracle: timm's own Attention run on each image's active subset,
    added to the residual."""
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(4, 9, 48)
    masks = _edge_masks(9)
    with torch.no_grad():
        out = sequence_added(x, masks, lambda t, bias: attention(attn, t, bias))
        for b in range(4):
            active = masks[b]
            expected = x[b].clone()
            expected[active] += attn(x[b:b + 1, active])[0]
            torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


def test_rowwise_added_touches_only_active_rows():
    x = torch.randn(4, 9, 16)
    masks = _edge_masks(9)
    out = rowwise_added(x, masks, lambda rows: rows * 2 + 1)
    torch.testing.assert_close(out, torch.where(masks[..., None], x + (x * 2 + 1), x), rtol=0, atol=0)


def test_dispatcher_thresholds_patch_tokens_and_keeps_cls_whatever_its_logit():
    dispatcher = TokenDispatcher(16)
    x = torch.randn(3, 9, 16)
    with torch.no_grad():
        x[:, 0] = -10 * torch.sign(dispatcher.mlp_head.weight[0])  # CLS's own logit far below 0
        dispatcher.mlp_head.bias.fill_(0.1)
        mask, logits = dispatcher(x)
    expected = F.linear(x[:, 1:], dispatcher.mlp_head.weight, dispatcher.mlp_head.bias).squeeze(-1)
    torch.testing.assert_close(logits, expected)  # up to float rounding: the GEMM runs on one more row
    assert mask[:, 0].all() and torch.equal(mask[:, 1:], logits > 0)
    assert 0 < int(mask[:, 1:].sum()) < mask[:, 1:].numel()  # both decisions occur

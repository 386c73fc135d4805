"""DyT + ToMe (token merging, issue 23): the PyTorch model and its ONNX export against an
independent re-implementation (tests/tome_reference.py), on ONNX Runtime and OpenVINO, batch
against one by one, with dispatchers steered to 0, all and 1 active tokens; the setting on the
command line, in the metadata, in `inspect`, `init` and validation; refusals (FLOPs: test_flops.py).

Two exports serve the module, both made by the command line from a checkpoint without ToMe:
a plain adapter with constant r = 2 at opset 17 (17 tokens -> 15 -> 13 -> 11) and a 4-expert
MoE-adapter with r = 3,0,8 at opset 21 (17 -> 14 -> 14 -> 8: block 2 is capped at 6).
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dyt_export import DyTConfig, build_model, load_checkpoint, save
from dyt_export.cli import main as dyt_export
from dyt_export.config import VARIANTS, parse_tome_r
from dyt_export.errors import UserError
from dyt_export.export import read_metadata
from runtimes import open_backend
from runtimes.torch_ref import TorchReference
from validation.compare import compare_masks, max_rel
from validation.costs import activation_rates, pooled_rate
from validation.cli import main as validation_main
from validation.data import load_inputs
from validation.harness import Options, validate
from validation.pictures import draw

from conftest import assert_refused, image_batch, small_config
from steering import ALL, steer
from tome_reference import reference

TARGETS = [0, ALL, 1]
"""Active patch tokens some image of the batch reaches at each dispatcher (of the merged tokens)."""
ONNX_TOLERANCE = 1e-4   # max |diff| <= this x max |logit|, runtimes against PyTorch
BATCH_TOLERANCE = 1e-5  # batch of 5 against five single-image runs
TWIN_TOLERANCE = 1e-5   # the product's float32 model against the float64 re-implementation
CASES = {"adapter-r2": (dict(experts=0), 2, 17), "moe4-r3,0,8": (dict(experts=4), (3, 0, 8), 21)}


def _images() -> torch.Tensor:
    return torch.from_numpy(image_batch(5, seed=3))


def _relative(a, b) -> float:
    return max_rel(np.asarray(a, np.float64), np.asarray(b, np.float64))


@dataclass
class Case:
    model: object
    """The product's PyTorch model, loaded from the checkpoint with tome_r."""
    checkpoint: Path
    onnx: Path
    tome_r: int | tuple[int, ...]
    opset: int
    images: torch.Tensor


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory) -> Case:
    """A steered model saved without ToMe, exported with `dyt-export --tome-r R --with-masks`."""
    overrides, tome_r, opset = CASES[request.param]
    root = tmp_path_factory.mktemp("tome")
    merging = build_model(small_config(tome_r=tome_r, **overrides), seed=0)
    steer(merging, _images(), TARGETS)  # on the merged tokens the dispatchers see
    plain = build_model(small_config(**overrides), init_weights=False)
    plain.load_state_dict(merging.state_dict())
    checkpoint = save(plain, root / "model.safetensors")
    onnx_path = root / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = dyt_export([str(checkpoint), "--tome-r", ",".join(map(str, np.atleast_1d(tome_r))),
                           "--with-masks", "--opset", str(opset), "-o", str(onnx_path)])
    assert code == 0
    assert "token merging (ToMe): r " in printed.getvalue()
    return Case(load_checkpoint(checkpoint, tome_r=tome_r), checkpoint, onnx_path, tome_r, opset, _images())


def test_the_export_records_the_setting_and_inspect_shows_it(case, run_cli):
    props = read_metadata(case.onnx)
    cfg = DyTConfig.from_json(props["dyt.config"])
    assert cfg == case.model.dyt_config and cfg.tome_r == tuple(np.broadcast_to(case.tome_r, 3))
    assert props["dyt.opset"] == str(case.opset)
    facts = json.loads(run_cli("inspect", case.onnx, "--json").stdout)
    tokens = [17] + [t - r for t, r in cfg.merge_schedule]
    assert facts["token_merging"].endswith("tokens " + " -> ".join(map(str, tokens)))
    assert [d["tokens"] for d in facts["dispatchers"]] == cfg.dispatcher_tokens == tokens[1:]
    assert facts["outputs"]["token_masks"] == ["batch", 3, 17]  # padded to N, whatever merged
    assert {"TopK", "ScatterElements"} <= set(facts["dispatch_ops"])


def test_the_reference_backend_follows_the_recorded_setting(case):
    ref = TorchReference(case.onnx)  # the caller's thread count, as the trace below: bit-identical
    assert ref.module.dyt_config.tome_r == case.model.dyt_config.tome_r
    out = ref.run({"pixel_values": case.images.numpy()})
    trace = case.model.trace(case.images)
    np.testing.assert_array_equal(out["logits"], trace.logits.numpy())
    np.testing.assert_array_equal(out["token_masks"], trace.masks.numpy())
    np.testing.assert_array_equal(out["merge_margins"], trace.merge_margins.numpy())


def test_a_model_without_token_merging_has_no_merge_to_tie():
    trace = build_model(small_config(), seed=0).trace(_images())
    assert trace.merge_margins.shape == (5, 3) and trace.merge_margins.isinf().all()


def test_steering_reaches_0_all_and_1_active_merged_tokens(case):
    masks = case.model.trace(case.images).masks[:, :, 1:].sum(dim=2)  # [B, D] active patch tokens
    for d, tokens in enumerate(case.model.dyt_config.dispatcher_tokens):
        count = TARGETS[d % len(TARGETS)]
        assert (tokens - 1 if count == ALL else count) in masks[:, d].tolist(), (d, masks[:, d])


@pytest.mark.parametrize("mode", ["dynamic", "masked", "dense"])
def test_pytorch_model_matches_the_independent_reimplementation(case, mode):
    trace = case.model.trace(case.images, mode)
    for i, image in enumerate(case.images):
        twin = reference(case.model, image, mode)
        assert min(twin.margins) > 1e-4  # no merge decision near a tie: the comparison is exact
        np.testing.assert_allclose(trace.merge_margins[i].numpy(), twin.margins, rtol=0, atol=1e-6)  # inf: r = 0
        assert _relative(trace.logits[i], twin.logits) <= TWIN_TOLERANCE, (mode, i)
        for d, mask in enumerate(twin.masks):
            np.testing.assert_array_equal(trace.masks[i, d, :len(mask)], mask)
            assert not trace.masks[i, d, len(mask):].any()  # padding is False
            assert trace.dispatch_logits[i, d, len(mask) - 1:].isnan().all()  # and NaN in the logits


@pytest.mark.parametrize("runtime", ["ort-cpu", "openvino"])
def test_onnx_matches_pytorch_and_the_reimplementation_batch_and_one_by_one(case, runtime):
    backend = open_backend(runtime, case.onnx, threads=1)
    batch = backend.run({"pixel_values": case.images.numpy()})
    trace = case.model.trace(case.images)
    np.testing.assert_array_equal(batch["token_masks"], trace.masks.numpy())
    assert _relative(batch["logits"], trace.logits) <= ONNX_TOLERANCE
    for i, image in enumerate(case.images):
        single = backend.run({"pixel_values": case.images[i:i + 1].numpy()})
        np.testing.assert_array_equal(single["token_masks"], trace.masks[i:i + 1].numpy())
        assert _relative(single["logits"][0], batch["logits"][i]) <= BATCH_TOLERANCE, i
        assert _relative(single["logits"][0], reference(case.model, image).logits) <= ONNX_TOLERANCE, i
        eager = case.model.trace(case.images[i:i + 1])
        assert _relative(eager.logits[0], trace.logits[i]) <= BATCH_TOLERANCE, i


def test_validation_compares_real_tokens_and_rates_them_per_block(case, tmp_path):
    outcome = validate(Options(runtime="ort-cpu", model=case.onnx, out=tmp_path, limit=12, threads=(1,),
                               throughput=False))
    record = outcome.record
    assert record["passed"], record["parity"]["failures"]
    assert record["parity"]["mask_agreement"] == 1.0 and record["model"]["twins"]["masks"] is None
    cfg = case.model.dyt_config
    images = load_inputs("digits", cfg.img_size, cfg.in_chans, limit=12).pixel_values
    masks = case.model.trace(torch.from_numpy(images)).masks.numpy()
    expected = [masks[:, d, 1:tokens].mean() for d, tokens in enumerate(cfg.dispatcher_tokens)]
    assert list(record["activation_rate"].values()) == pytest.approx(expected)


def test_pictures_draw_the_activation_chart_only(case, tmp_path):
    paths = draw(case.onnx, tmp_path, count=2, data="digits")
    assert [p.name for p in paths] == ["model-activation.png"]  # a merged token is no longer one patch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-activation.png"]


def test_mask_padding_is_never_active_nor_counted():
    layers, tokens = ["blocks.0.mlp", "blocks.1.mlp"], [5, 3]
    ref = np.zeros((2, 2, 5), bool)
    ref[:, :, 0] = True
    ref[:, 0, 1:3] = True
    ref[:, 1, 1] = True
    logits = np.where(ref[:, :, 1:], 1.0, -1.0)
    logits[:, 1, 2:] = np.nan  # the second dispatcher sees 3 tokens: its row's last 2 are padding
    agreement, flips, after, failures = compare_masks(ref, logits, ref.copy(), layers, 1e-5, tokens)
    assert (agreement, flips, after, failures) == (1.0, [], 0, [])
    wrong = ref.copy()
    wrong[0, 0, 4] = True  # a real token, far from the threshold
    agreement, _, _, failures = compare_masks(ref, logits, wrong, layers, 1e-5, tokens)
    assert agreement == pytest.approx(1 - 1 / 16) and "token 4" in failures[0]  # 16 real decisions, not 20
    padded = ref.copy()
    padded[1, 1, 3] = True
    _, _, _, failures = compare_masks(ref, logits, padded, layers, 1e-5, tokens)
    assert "image 1, blocks.1.mlp token 3: padding (the dispatcher sees 3 tokens) must be False" in failures[0]
    assert activation_rates(ref, tokens).tolist() == [0.5, 0.5]  # 2 of 4 and 1 of 2 patch tokens
    assert activation_rates(ref).tolist() == [0.5, 0.25]  # counted over N, padding would dilute the rate
    assert pooled_rate(ref, tokens) == pytest.approx(3 / 6)


def test_config_normalises_caps_and_keeps_old_configs_unchanged():
    cfg = small_config(tome_r=2)
    assert cfg.tome_r == (2, 2, 2) and cfg.merge_schedule == ((17, 2), (15, 2), (13, 2))
    assert small_config(tome_r=(0, 0, 0)).tome_r is None and small_config(tome_r=0) == small_config()
    assert small_config(tome_r=100).merge_schedule == ((17, 8), (9, 4), (5, 2))  # at most half the non-CLS tokens
    assert "tome_r" not in small_config().to_dict()  # files without ToMe keep the config they had
    assert DyTConfig.from_json(cfg.to_json()) == cfg and json.loads(cfg.to_json())["tome_r"] == [2, 2, 2]
    assert parse_tome_r("8") == 8 and parse_tome_r("3,0,8") == (3, 0, 8)
    for text in ("x", "-1", "2,,1", ""):
        with pytest.raises(UserError, match="--tome-r takes an integer >= 0 or a comma list"):
            parse_tome_r(text)
    with pytest.raises(UserError, match="tome_r lists 2 values; the model has 3 blocks"):
        small_config(tome_r=(1, 2))
    with pytest.raises(UserError, match="tome_r must be an integer >= 0"):
        small_config(tome_r=(1, -2, 0))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "mlp"])
def test_attention_dispatch_with_tome_is_refused_with_the_reason(variant, run_cli, tmp_path):
    with pytest.raises(UserError, match=f"needs every token's attention keys, which {variant} dispatch"):
        small_config(variant=variant, tome_r=2)
    checkpoint = save(build_model(small_config(variant=variant, depth=2), seed=0), tmp_path / "m.safetensors")
    assert_refused(run_cli(checkpoint, "--tome-r", "2", "-o", tmp_path / "m.onnx"),
                   f"which {variant} dispatch does not compute for inactive tokens", tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--tome-r", "2", "--fp16"], "exports in fp32 only: fp16 rounding changes which tokens merge"),
    (["--tome-r", "2", "--int8"], "exports in fp32 only: int8 rounding changes which tokens merge"),
    (["--tome-r", "2,2"], "tome_r lists 2 values; the model has 3 blocks"),
    (["--tome-r", "2,x"], "--tome-r takes an integer >= 0 or a comma list"),
])
def test_export_refusals_are_one_line_and_leave_nothing(flags, message, run_cli, tmp_path):
    checkpoint = save(build_model(small_config(), seed=0), tmp_path / "m.safetensors")
    assert_refused(run_cli(checkpoint, *flags, "-o", tmp_path / "x.onnx"), message, tmp_path)


def test_init_records_the_setting_and_calibrates_on_merged_tokens(run_cli, tmp_path):
    out = tmp_path / "model.safetensors"
    result = run_cli("init", "--backbone", "vit_tiny_patch16_224", "--tome-r", "8", "--activation", "0.5", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "token merging (ToMe): r 8 per block; tokens 197 -> 189" in result.stdout
    model = load_checkpoint(out)
    assert model.dyt_config.tome_r == (8,) * 12
    rates = model.dyt_config.extra["init"]["calibration"]["rates"]
    patches = 16 * (np.array(model.dyt_config.dispatcher_tokens) - 1)
    assert all(abs(r - 0.5) <= 1 / p + 1e-4 for r, p in zip(rates, patches))  # over the merged tokens, not N
    assert load_checkpoint(out, tome_r=0).dyt_config.tome_r is None  # 0 turns a recorded setting off


def test_validation_tome_r_is_for_the_demo_model(tmp_path):
    with pytest.raises(UserError, match="--tome-r exports the demo model with token merging"):
        validate(Options(runtime="ort-cpu", model=tmp_path / "given.onnx", out=tmp_path, tome_r=2, throughput=False))


@pytest.mark.slow
def test_python_m_validation_tome_r_validates_a_tome_export_of_the_demo(tmp_path, capsys):
    """`python -m validation --tome-r 2`: the trained demo model (65 tokens -> 57) exported with
    ToMe passes on both CPU runtimes with its accuracy, masks compared over the merged tokens.
    Some digits merge on a near tie (on a Xeon with AVX-512, image 62 at a matching margin of
    6e-8 merged otherwise on both runtimes): they must be reported as merge ties, and only
    they may carry mask differences or logits beyond the tolerance."""
    for runtime in ("ort-cpu", "openvino"):
        code = validation_main(["--tome-r", "2", "--runtime", runtime, "--no-throughput", "--threads", "1",
                                "--out", str(tmp_path), "--quiet"])
        assert code == 0, capsys.readouterr().err
        record = json.loads((tmp_path / f"{runtime}.json").read_text())
        assert record["model"]["name"] == "dyt_digits-tome2" and record["model"]["config"]["tome_r"] == [2, 2, 2, 2]
        parity = record["parity"]
        assert parity["max_rel"] <= ONNX_TOLERANCE and not parity["flips"]
        assert all(t["margin"] <= record["tolerances"]["merge_tie"] for t in parity["merge_ties"])
        assert (parity["mask_agreement"] < 1.0) == (parity["after_merge_tie"] > 0)  # every mask difference is a tie's
        assert parity["merge_ties"] or not parity["after_merge_tie"]
        assert parity["images_compared_on_top1_cosine"] == len(parity["merge_ties"])
        assert record["accuracy"]["reference"] >= 0.9 and record["accuracy"]["runtime"] == record["accuracy"]["reference"]

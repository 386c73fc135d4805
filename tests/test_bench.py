"""make bench's parts: the public eager path, the turn-taking timer, the ratios and targets, the
docs section, the GEMM runners, peak memory, the ToMe rows.
Nothing here times anything for a claim: speed comes from `make bench` only."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch

from conftest import force_dispatcher, image_batch, small_config
from dyt_export import build_model, load_checkpoint, write_public_checkpoint
from dyt_export.calibrate import calibrate_dispatchers
from dyt_export.config import DyTConfig
from dyt_export.export import export_onnx, read_metadata
from dyt_export.flops import macs_per_image
from runtimes import open_backend
from validation.bench import cli as bench
from validation.bench.memory import external_copy, measure_here
from validation.bench.models import trained_like
from validation.bench.report import (DOCS_BEGIN, DOCS_END, Result, memory_table, results_from_record, section_tables,
                                     target_checks, targets_table, write_docs)
from validation.bench.tome import DENSE_TOME, TOME_R, ToMeModel, contender, tome_checks, tome_exports, tome_rows, tome_table
from validation.bench.gemm import LIBRARIES, matmul_runner
from validation.bench.public_eager import PublicEagerDyT
from validation.bench.turns import paired_ratio, row, take_turns
from validation.costs import active_counts


@pytest.fixture(scope="module")
def trained_small(tmp_path_factory):
    """A small model with non-zero biases (so bias forms exist in its graph), block 2 silenced."""
    model = trained_like(build_model(small_config(), seed=0), seed=0)
    force_dispatcher(model, 2, active=False)
    path = tmp_path_factory.mktemp("bench") / "small.onnx"
    export_onnx(model, path)
    return model, path


@pytest.mark.parametrize("batch", [1, 4])
def test_public_eager_path_gives_the_toolkits_logits(trained_small, batch):
    model, _ = trained_small
    x = image_batch(batch, seed=3)
    ref = model.trace(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(PublicEagerDyT(model)(x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_public_eager_path_refuses_what_the_public_code_cannot_hold():
    with pytest.raises(ValueError, match="MLP Dispatch"):
        PublicEagerDyT(build_model(small_config(variant="attn"), seed=0))


def test_take_turns_runs_every_contender_on_every_batch_in_rotating_order():
    calls: list[tuple[str, int]] = []
    runners = {name: (lambda feed, name=name: calls.append((name, int(feed[0, 0])))) for name in "abc"}
    images = np.arange(6, dtype=np.float32).reshape(6, 1)
    latencies = take_turns(runners, images, batch=2, passes=2)
    assert {k: len(v) for k, v in latencies.items()} == {"a": 6, "b": 6, "c": 6}
    warmup, timed = calls[:9], calls[9:]
    assert sorted(warmup) == sorted((n, i) for n in "abc" for i in (0, 2, 4))
    firsts = [timed[i][0] for i in range(0, len(timed), 3)]
    assert firsts[:3] == ["a", "b", "c"]  # who goes first rotates call by call
    assert all(len({timed[i + k][1] for k in range(3)}) == 1 for i in range(0, len(timed), 3))  # same batch per turn
    # one batch per pass: min_calls adds whole passes until every contender has that many calls
    assert {k: len(v) for k, v in take_turns(runners, images, batch=6, min_calls=3).items()} == {"a": 3, "b": 3, "c": 3}
    assert {k: len(v) for k, v in take_turns(runners, images, batch=3, min_calls=3).items()} == {"a": 4, "b": 4, "c": 4}
    r = row([0.5, 1.5], batch=4, threads=2, activation_rate=0.5)
    assert r.img_per_s == pytest.approx(4.0) and r.calls == 2


def test_settled_turns_run_each_contender_twice_in_a_row_and_time_the_second_call():
    calls: list[str] = []

    def runner(name: str):
        def run(feed):
            calls.append(name)
            if calls[-2:] != [name, name]:  # the first call after another contender is the slow one
                time.sleep(0.02)
        return run
    images = np.zeros((4, 1), dtype=np.float32)
    latencies = take_turns({"a": runner("a"), "b": runner("b")}, images, batch=2, settle=True)
    timed = calls[4:]
    assert timed == [n for pair in (["a", "b"], ["b", "a"]) for n in pair for _ in range(2)]
    assert max(max(v) for v in latencies.values()) < 0.015  # the slow first calls were not timed


def test_paired_ratio_ignores_a_burst_that_hits_one_turn():
    dense = [2.0, 2.0, 20.0, 2.0, 2.0]  # a burst of load in turn 3 slows both calls
    dyt = [1.0, 1.0, 15.0, 1.0, 1.0]
    assert paired_ratio(dense, dyt) == pytest.approx(2.0)
    assert sum(dense) / sum(dyt) < 1.5  # the ratio of totals is dragged by the burst
    with pytest.raises(ValueError):
        paired_ratio([1.0], [])


def _result(**kw) -> Result:
    base = dict(runtime="ort-cpu", threads=2, batch=1, rate=0.5, activation=0.5, dyt_gmacs=12.0, dense_gmacs=18.0,
                dyt_img_s=3.0, dense_img_s=2.0, eager_img_s=2.0, masked_img_s=None, gemm_gmac_s=100.0,
                group_gemm_gmac_s=None)
    return Result(**{**base, **kw})


def test_ratios_follow_the_issue_definitions():
    r = _result()
    assert r.speedup == pytest.approx(1.5) and r.ideal == pytest.approx(1.5) and r.efficiency == pytest.approx(1.0)
    assert r.roofline == pytest.approx(3.0 * 12.0 / 100.0)
    assert r.vs_eager == pytest.approx(1.5)
    assert _result(eager_img_s=None).vs_eager is None


def test_targets_use_the_worst_rate_and_report_misses():
    results = [_result(), _result(rate=0.3, dyt_img_s=2.5), _result(batch=8, eager_img_s=None)]
    memory = [{"runtime": "ort-cpu", "batch": 1, "model": "dense", "peak_mb": 100.0},
              {"runtime": "ort-cpu", "batch": 1, "model": "dyt@0.5", "peak_mb": 101.0}]
    checks = {(c["target"], c["batch"]): c for c in target_checks(results, memory)}
    assert checks[("efficiency", 1)]["measured"] == pytest.approx(2.5 / 2.0 / 1.5)  # the worse of the two rates
    assert not checks[("efficiency", 1)]["met"] and checks[("efficiency", 8)]["met"]
    assert ("vs_eager", 8) not in checks  # no eager measurement, no claim
    assert checks[("roofline", 1)]["needed"] == 0.85 and checks[("roofline", 8)]["needed"] == 0.95
    assert not checks[("memory DyT/dense", 1)]["met"]
    assert checks[("memory DyT/dense", 1)]["measured"] == pytest.approx(1.01)
    table = targets_table(target_checks(results, memory))
    assert "| memory DyT/dense | ort-cpu | 1 | 1.010 | <= 1 | no (missed by 1.0%) |" in table  # not "by 1%", nor "0%"


def test_memory_targets_are_one_per_allocator_and_weights_layout():
    """Rows of another layout or allocator never serve as the dense baseline of a DyT row."""
    def row(model: str, mb: float, **setup: str) -> dict:
        return {"runtime": "ort-cpu", "batch": 1, "model": model, "peak_mb": mb, "allocator": "glibc default", **setup}
    memory = [row("dense", 100.0), row("dyt@0.5", 140.0), row("dense", 90.0, weights="external data"),
              row("dyt@0.5", 89.0, weights="external data"), row("dense", 95.0, allocator="mmap threshold 1 MiB"),
              row("dyt@0.5", 96.0, allocator="mmap threshold 1 MiB")]
    checks = {c["target"]: c for c in target_checks([], memory)}
    assert checks["memory DyT/dense (glibc default)"]["measured"] == pytest.approx(1.4)
    assert checks["memory DyT/dense (glibc default, external data)"]["measured"] == pytest.approx(89 / 90)
    assert checks["memory DyT/dense (glibc default, external data)"]["met"]
    assert checks["memory DyT/dense (mmap threshold 1 MiB)"]["measured"] == pytest.approx(96 / 95)
    for m in memory:
        m.update(baseline_mb=30.0, peak_over_baseline_mb=m["peak_mb"] - 30.0)
    assert "| ort-cpu | glibc default | external data | 1 | dyt@0.5 | 89 | 30 | 59 |" in memory_table(memory)
    assert memory_table([]) == "Peak memory: not measured (`--memory-batches ''`, or `--only` without `memory`)."  # no header without rows


def test_int8_rows_and_targets_cover_both_activation_forms():
    """Each --int8-activations form is timed against the same fp32 calls and gets targets of
    its own; a record from before the dynamic form (no activations key, the demo's runtimes
    at its top level) still reads as the static form."""
    from validation.bench.int8 import int8_checks, int8_rows, int8_table

    timed = {("ort-cpu", 2, 1): {"dyt@0.5": [0.2] * 3, "int8@0.5": [0.1] * 3, "int8-dynamic@0.5": [0.125] * 3}}
    rows = int8_rows(timed, 0.5)
    assert [(r["activations"], r["speedup"]) for r in rows] == [("static", pytest.approx(2.0)), ("dynamic", pytest.approx(1.6))]

    def agreement(top1: float) -> dict:
        return {"top1_agreement": top1, "accuracy_fp32": 0.9, "accuracy_int8": 0.9}
    demo = {"test_images": 10, "calibration_images": 5,
            "forms": {"static": {"ort-cpu": agreement(0.995)}, "dynamic": {"ort-cpu": agreement(0.98)}}}
    assert {(c["target"], c["met"]) for c in int8_checks(rows, demo, threads=2)} == {
        ("int8 speed-up", True), ("int8 speed-up (dynamic activations)", False),
        ("int8 top-1 agreement (demo)", True), ("int8 top-1 agreement (demo) (dynamic activations)", False)}
    table = int8_table(rows, demo)
    assert "| dynamic | ort-cpu | 1 | 5.00 | 8.00 | 1.60x (1.60) | missed (>= 1.8x) |" in table
    assert "| dynamic | ort-cpu | 0.9800 |" in table
    old_rows = [{k: v for k, v in rows[0].items() if k != "activations"}]
    old_demo = {"test_images": 10, "calibration_images": 5, "ort-cpu": agreement(0.995)}
    assert [c["target"] for c in int8_checks(old_rows, old_demo, threads=2)] == ["int8 speed-up", "int8 top-1 agreement (demo)"]
    assert "| static | ort-cpu | 0.9950 |" in int8_table(old_rows, old_demo)


def test_a_bench_record_gives_back_its_results():
    results = [_result(), _result(batch=8, eager_img_s=None, paired_speedup=1.4)]
    assert results_from_record({"results": [r.to_dict() for r in results]}) == results


def test_docs_section_is_replaced_between_markers_only(tmp_path):
    path = tmp_path / "performance.md"
    write_docs(path, "first")
    text = path.read_text().replace(DOCS_END, DOCS_END + "\n\n## Levers\nhand-written")
    path.write_text(text)
    write_docs(path, "second")
    text = path.read_text()
    assert "second" in text and "first" not in text and "hand-written" in text
    assert text.index(DOCS_BEGIN) < text.index("second") < text.index(DOCS_END)


@pytest.mark.parametrize("library", LIBRARIES)
def test_gemm_runners_compute_the_product(library):
    product = matmul_runner(library, (48, 64, 32), threads=1)()
    rng = np.random.default_rng(0)
    want = rng.standard_normal((48, 64), dtype=np.float32) @ (rng.standard_normal((64, 32), dtype=np.float32) / np.float32(8))
    assert product.shape == (48, 32)
    np.testing.assert_allclose(product, want, rtol=1e-4, atol=1e-4)


def test_peak_memory_figures_are_ordered(trained_small):
    _, path = trained_small
    m = measure_here("ort-cpu", path, image_batch(4), batch=2, threads=1)
    assert m["baseline_mb"] <= m["peak_mb"] and m["loaded_mb"] <= m["peak_mb"]
    assert m["peak_over_baseline_mb"] == pytest.approx(m["peak_mb"] - m["baseline_mb"])


def test_external_copy_is_the_same_graph_with_its_weights_beside_it(trained_small, tmp_path):
    _, path = trained_small
    copy = external_copy(path, tmp_path / "ext")
    assert copy.with_name(copy.name + ".data").stat().st_size > copy.stat().st_size
    x = image_batch(2)
    want = open_backend("ort-cpu", path).run({"pixel_values": x})["logits"]
    np.testing.assert_array_equal(open_backend("ort-cpu", copy).run({"pixel_values": x})["logits"], want)
    assert {p.key: p.value for p in onnx.load(str(copy), load_external_data=False).metadata_props} == \
        {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize("args, message", [
    (["--passes", "0"], "--passes: expected a finite integer >= 1"),
    (["--min-calls", "-1"], "--min-calls: expected a finite integer >= 1"),
    (["--rates", "0.5,1"], "--rates: expected activation rates between 0 and 1"),
    (["--threads", "2,x"], "--threads: expected thread counts or 'all'"),
    (["--runtimes", "ort-cuda"], "--runtimes: unknown runtime(s) ort-cuda; choose from ort-cpu, openvino"),
    (["--only", "tome,gpu"], "--only: unknown section(s) gpu; choose from masked, int8, eager, memory, tome"),
    (["--batches", "8,0"], "--batches: expected positive integers"),
    (["--pin-ort-batch", "--images", "30"], "--images 30 must be a multiple of every batch size"),
    (["--backbone", "vit_base_patch16_2244"], "vit_base_patch16_2244"),
    (["--backbone", "vit_huge_patch14_224"], "fp32 weights fit in the ONNX file (1.8 GB at most)"),
    (["--seed", str(2**32)], "--seed: expected a finite integer from 0 to"),
    (["--out", "FILE"], "exists and is not a directory"),
    (["--report", "MISSING"], "no such file"),
    (["--report", "NOT_A_RECORD"], "is not a bench.json written by make bench"),
])
def test_bad_requests_exit_2_with_one_line_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    """Half an hour of measuring must not end in an error a look at the arguments could give."""
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("measuring started"))
    (tmp_path / "file").write_text("")
    (tmp_path / "record.json").write_text("{}")
    paths = {"FILE": tmp_path / "file", "MISSING": tmp_path / "missing.json", "NOT_A_RECORD": tmp_path / "record.json"}
    code = bench.main([str(paths.get(a, a)) for a in args] + ["--docs", ""])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bench_refuses_a_disk_its_models_do_not_fit_on(tmp_path, capsys, monkeypatch):
    """ViT-Ti's 23 MB of weights make 3 rates need ~0.4 GB, ~0.2 GB for DyT and dense alone
    (`--only ''`); with 0.1 GB free the run stops before measuring, and an earlier run's files,
    which it would replace, count as free."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**8, 10**8))
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("measuring started"))
    argv = ["--backbone", "vit_tiny_patch16_224", "--rates", "0.3,0.5,0.7", "--out", str(tmp_path), "--docs", ""]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "needs about 0.4 GB" in err and "0.1 GB are free" in err, err
    assert bench.main([*argv, "--only", ""]) == 2 and "needs about 0.2 GB" in capsys.readouterr().err
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / "dyt-r0.5.onnx", "wb") as earlier:
        earlier.truncate(4 * 10**8)
    started = []
    monkeypatch.setattr(bench, "run", lambda args: started.append(args.out) or 1 / 0)
    bench.main(argv)
    assert started == [tmp_path], capsys.readouterr().err


@pytest.fixture(scope="module")
def tome_exports_small(tmp_path_factory):
    """The bench's ToMe exports (no timing) of a small model calibrated to 0.7 and saved in the
    public layout as the bench saves its checkpoints, with the DyT masks on the pool; a second
    rate, 0.3, is loaded with ToMe and traced but not exported (rows never open the files,
    and each export takes seconds)."""

    work = tmp_path_factory.mktemp("tome-bench")
    pool = torch.from_numpy(image_batch(8, seed=1))
    checkpoints, dyt = {}, {}
    for rate in (0.3, 0.7):
        model = trained_like(build_model(small_config(), seed=0), seed=0)
        calibrate_dispatchers(model, rate, torch.from_numpy(image_batch(16, seed=0)))
        checkpoints[rate] = write_public_checkpoint(model, work / f"dyt-r{rate:g}.pth", args={"token_target_ratio": rate})
        dyt[rate] = model.trace(pool).masks.numpy()
    ex = tome_exports({0.7: checkpoints[0.7]}, 0.7, work, pool)
    low = load_checkpoint(checkpoints[0.3], tome_r=TOME_R)
    ex.models.insert(0, ToMeModel(0.3, low.dyt_config, work / "not-exported.onnx", low.trace(pool).masks.numpy()))
    return dyt, model.dyt_config, ex


def test_tome_rows_pair_each_tome_export_with_its_dyt_and_dense_calls(tome_exports_small):
    """ToMe over DyT, over dense and dense + ToMe over dense: paired ratios of the same turns'
    calls, against MAC ratios of the merged config at each model's own masks."""

    dyt_masks, cfg, ex = tome_exports_small
    assert [m.config.tome_r for m in ex.models] == [(8, 8, 8)] * 2  # 17 tokens -> 9 -> 5 -> 3 (capped)
    assert ex.models[0].masks.shape == dyt_masks[0.3].shape  # padded to the unmerged token count
    assert set(ex.onnx_files()) == {"dyt+tome@0.3", "dyt+tome@0.7", DENSE_TOME}
    assert ex.onnx_files()["dyt+tome@0.7"].exists() and ex.onnx_files()[DENSE_TOME].exists()
    merged = DyTConfig.from_json(read_metadata(ex.onnx_files()[DENSE_TOME])["dyt.config"])
    assert merged.tome_r == (8, 8, 8) and merged == ex.models[1].config  # the export merges as the model does
    calls = {"dense": [4.0, 4.0, 40.0], DENSE_TOME: [2.0, 3.2, 20.0]}  # a burst in turn 3 hits every contender
    for rate, dyt, tome in [(0.3, [2.0, 2.0, 20.0], [1.6, 1.6, 17.0]), (0.7, [3.0, 3.0, 30.0], [2.5, 2.5, 20.0])]:
        calls |= {f"dyt@{rate:g}": dyt, contender(rate): tome}
    timed = {("ort-cpu", 2, 8): calls, ("torch", 2, 8): {"dyt@0.3": [1.0] * 3}}
    rows = tome_rows(timed, ex, dyt_masks, cfg, middle=0.7)
    assert [(r["runtime"], r["rate"]) for r in rows] == [("ort-cpu", 0.3), ("ort-cpu", 0.7)]  # no eager row
    low, middle = rows

    def gmacs(cfg, masks):
        return float(macs_per_image(cfg, None if masks is None else active_counts(masks)).mean()) / 1e9
    dyt_gmacs, tome_gmacs = gmacs(cfg, dyt_masks[0.3]), gmacs(ex.models[0].config, ex.models[0].masks)
    assert tome_gmacs < dyt_gmacs
    assert low["gmacs"] == pytest.approx({"dyt": dyt_gmacs, "dyt_tome": tome_gmacs, "dense": gmacs(cfg, None)})
    assert low["over_dyt"] == pytest.approx({"speedup": 1.25, "ideal": dyt_gmacs / tome_gmacs,
                                             "efficiency": 1.25 / (dyt_gmacs / tome_gmacs)})
    assert low["over_dense"]["speedup"] == pytest.approx(2.5)
    assert "dense_tome_over_dense" not in low and low["img_s"].keys() == {"dyt", "dyt_tome", "dense"}
    assert middle["dense_tome_over_dense"]["speedup"] == pytest.approx(2.0)  # median of 2, 1.25, 2
    assert middle["dense_tome_over_dense"]["ideal"] == pytest.approx(
        gmacs(cfg, None) / gmacs(ex.models[1].config, None))
    assert middle["over_dyt"]["speedup"] == pytest.approx(1.2)
    assert middle["img_s"]["dyt_tome"] == pytest.approx(8 * 3 / 25.0)

    checks = tome_checks(rows + [{**low, "batch": 1}], threads=2)  # no target at batch 1
    worst = min(r["over_dyt"]["efficiency"] for r in rows)
    assert checks == [{"target": "ToMe r=8 efficiency over DyT", "runtime": "ort-cpu", "batch": 8,
                       "measured": pytest.approx(worst), "needed": 0.9, "met": worst >= 0.9}]
    table = tome_table(rows)
    assert (f"| ort-cpu | 2 | 8 | 0.3 | {low['activation_dyt']:.3f} / {low['activation_dyt_tome']:.3f} | "
            f"{dyt_gmacs:.2f} / {tome_gmacs:.2f} | {low['img_s']['dyt']:.2f} / {low['img_s']['dyt_tome']:.2f} / "
            f"{low['img_s']['dense']:.2f} / - | 1.25x ({dyt_gmacs / tome_gmacs:.2f}) | "
            f"{low['over_dyt']['efficiency']:.3f} | 2.50x (") in table
    assert f"| 2.00x ({middle['dense_tome_over_dense']['ideal']:.2f}) | " in table.splitlines()[3]


def test_the_report_shows_the_sections_a_record_measured():
    """A --only run's docs hold no empty int8 or ToMe table; records from before ToMe still render."""

    int8 = {"rows": [], "demo": None}
    assert section_tables({"int8": int8}) == {} == section_tables({"int8": int8, "tome": {"rows": []}})
    row = {"runtime": "openvino", "threads": 2, "batch": 32, "rate": 0.5, "activation_dyt": 0.5, "activation_dyt_tome": 0.49,
           "gmacs": {"dyt": 12.2, "dyt_tome": 9.1}, "img_s": {"dyt": 10.0, "dyt_tome": 12.5, "dense": 6.0},
           "over_dyt": {"speedup": 1.25, "ideal": 1.34, "efficiency": 0.933},
           "over_dense": {"speedup": 2.0, "ideal": 1.95, "efficiency": 1.026}}
    tables = section_tables({"int8": int8, "tome": {"rows": [row]}})
    assert list(tables) == ["DyT + ToMe (`dyt-export --tome-r 8`, docs/tome.md)"]
    assert "| openvino | 2 | 32 | 0.5 | 0.500 / 0.490 | 12.20 / 9.10 | 10.00 / 12.50 / 6.00 / - | 1.25x (1.34) | 0.933 | " \
           "2.00x (1.95) | 1.026 | - | - |" in tables["DyT + ToMe (`dyt-export --tome-r 8`, docs/tome.md)"]

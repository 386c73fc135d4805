"""validation.gemm_ceiling: the block layers' shapes, the bound built from their GEMM rates,
and the command. Rates here come from tiny calls and are never read as figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import small_config
from dyt_export.flops import count_macs
from validation import gemm_ceiling
from validation.gemm import shape_name
from validation.gemm_ceiling import active_tokens, bench_config, block_layers, linear_bound

LINEAR_TERMS = ("qkv", "attn_proj", "mlp", "adapter")


def _linear_macs(cfg, mlp_tokens):
    counts = None if mlp_tokens == cfg.num_tokens else np.full((1, len(cfg.dispatcher_names)), mlp_tokens)
    terms = count_macs(cfg, counts).by_term()
    return sum(float(terms[t][0]) for t in LINEAR_TERMS), float(count_macs(cfg, counts).per_image()[0])


@pytest.mark.parametrize("cfg", [small_config(), bench_config()], ids=["small", "vit-b16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_block_layers_hold_exactly_the_linear_macs_of_the_flops_count(cfg, batch, rate):
    """The shapes timed must be the model's: per image, depth times their MACs are the qkv,
    projection, MLP and adapter terms of dyt_export.flops, dense and dispatched."""
    tokens = active_tokens(cfg, rate)
    layers = block_layers(cfg, batch, tokens)
    assert {layer.term for layer in layers} == set(LINEAR_TERMS)
    timed = cfg.depth * sum(math.prod(layer.shape) for layer in layers) / batch
    assert timed == pytest.approx(_linear_macs(cfg, tokens)[0], rel=1e-12)
    assert all(layer.shape[0] == batch * tokens for layer in layers if layer.term == "mlp")


def test_bench_config_is_vit_b16_at_its_published_macs():
    cfg = bench_config()
    assert (cfg.embed_dim, cfg.depth, cfg.num_tokens, cfg.bottleneck) == (768, 12, 197, 64)
    assert active_tokens(cfg, 0.3) == 60 and active_tokens(cfg, 1.0) == cfg.num_tokens


@pytest.mark.parametrize("batch", [1, 8])
def test_linear_bound_weighs_each_layer_by_its_macs(batch):
    cfg, best = bench_config(), 80.0
    for tokens in (cfg.num_tokens, active_tokens(cfg, 0.3)):
        shapes = {layer.shape for layer in block_layers(cfg, batch, tokens)}
        assert linear_bound(cfg, batch, tokens, dict.fromkeys(shapes, best), best) == pytest.approx(best)
        linear, total = _linear_macs(cfg, tokens)
        half = linear_bound(cfg, batch, tokens, dict.fromkeys(shapes, best / 2), best)
        assert half == pytest.approx(total / (2 * linear / best + (total - linear) / best))
        assert best / 2 < half < best


def test_only_the_benchmarks_variant_is_laid_out():
    with pytest.raises(ValueError, match="only the benchmark's MLP Dispatch"):
        block_layers(small_config(variant="attn"), 1, 17)


def test_command_measures_every_shape_and_writes_the_record(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    argv = ["--batches", "1", "--rate", "0.5", "--reps", "1", "--rounds", "1", "--size", "64",
            "--libraries", "onnxruntime", "--out", str(out)]
    assert gemm_ceiling.main(argv) == 0
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    cfg = bench_config()
    shapes = {shape_name(layer.shape) for tokens in (cfg.num_tokens, record["mlp_tokens"])
              for layer in block_layers(cfg, 1, tokens)}
    assert set(row["gmac_per_s"]) == shapes and all(v > 0 for v in row["gmac_per_s"].values())
    assert record["best"] == max(record["best_by_library"].values())
    assert row["ceiling_dyt"] == pytest.approx(row["bound_dyt"] / record["best"])
    table = capsys.readouterr().out
    assert "| onnxruntime | 1 |" in table and f"{row['ceiling_dense']:.3f}" in table


def test_best_rates_keep_each_shapes_best_round_and_time_each_job_once_per_round(monkeypatch):
    """Rounds exist so that one slow stretch does not decide a rate: the best round must win,
    and a job listed twice (a shape two batches share) must not be timed twice per round."""
    from validation import gemm

    calls = []
    slow_then_fast = {("numpy", (1, 2, 3)): iter([5.0, 9.0, 7.0]), ("torch", (1, 2, 3)): iter([4.0, 2.0, 3.0])}
    monkeypatch.setattr(gemm, "gemm_rate", lambda lib, threads, shape, reps: calls.append((lib, shape))
                        or next(slow_then_fast[lib, shape]))
    jobs = [("numpy", (1, 2, 3)), ("torch", (1, 2, 3)), ("numpy", (1, 2, 3))]
    assert gemm.best_rates(jobs, threads=1, reps=1, rounds=3) == {("numpy", (1, 2, 3)): 9.0, ("torch", (1, 2, 3)): 4.0}
    assert calls == [("numpy", (1, 2, 3)), ("torch", (1, 2, 3))] * 3


def test_gemm_command_prints_a_rate_per_library_and_shape(capsys):
    from validation import gemm

    assert gemm.main(["--shapes", "256x128x64,64x64x128", "--libraries", "numpy,onnxruntime", "--rounds", "1", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 256x128x64 ", "| 64x64x128 "))]
    assert len(rows) == 2 and all(len(row.split("|")) == 5 and float(row.split("|")[2]) > 0 for row in rows)

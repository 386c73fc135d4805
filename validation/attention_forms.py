"""Experiment: which ONNX form of "attention over each image's active tokens" runs fastest
while staying exact. Not a test; results and the decision are in docs/variants.md.

Every form compacts each image's active tokens to the front of its row, pads to the batch's
largest active count, masks padded keys, and adds the results back to the residual. They
differ in how (ONNX ops in brackets):

* `sort` (shipped, `dyt_export.model.gather.sequence_added`): flat row index [B*L] into
  [B*N, C] (Gather / ScatterND into zeros, then Add), order from a full sort of a unique key
  (TopK(N) + Slice);
* `add`: `sort` adding into the residual inside the scatter (ScatterND reduction "add"), the
  lever measured on the MLP units in `validation.levers`;
* `rows`: the same with TopK(longest) instead of the full sort (shipped before this
  experiment's last round);
* `elements`: `rows` with per-element indices [B, L, C] (GatherElements / ScatterElements),
  the form first shipped;
* `sdpa`: `rows` with `F.scaled_dot_product_attention` instead of matmul + softmax; its mask
  has to be expanded to [B, 1, L, L]: with the broadcast [B, 1, 1, L] mask export fails on a
  guard Eq(1, L).

Each form is exported from the same calibrated ViT-B/16 (activation 0.5, `dyt_export.init_model`)
for the attention-dispatching variants and timed on ORT-CPU and OpenVINO with
`validation.throughput.measure`, the forms interleaved round by round. Exactness: logits
against the PyTorch model (max |diff| / max |logit|) and batch against one-by-one runs on
the same runtime. `--memory B` adds each form's peak resident memory at batch B, and that of
the model's `--dispatch dense` export beside them, one fresh process per figure
(`validation.bench_memory`); `--memory-only` skips the timing. `--fixed-batch` times, and
measures, each form again with the runtime pinned to the batch (the backends' `fixed_batch`),
its logits checked against the dynamic backend's.

    .venv/bin/python -m validation.attention_forms --out /tmp/forms --export-only
    flock -x /tmp/dyt-bench.lock .venv/bin/python -m validation.attention_forms --out /tmp/forms
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

import dyt_export.model.block as block_module
import dyt_export.model.gather as gather_module
from dyt_export.calibrate import image_like
from dyt_export.errors import UserError
from dyt_export.export import export_onnx, summarize
from dyt_export.init_model import init_model
from dyt_export.model.gather import SeqFn, key_padding_bias
from runtimes import CPU_RUNTIMES, Backend, open_backend
from validation.compare import max_rel
from validation.interleave import interleaved


def _elements(x: torch.Tensor, mask: torch.Tensor, fn: SeqFn) -> torch.Tensor:
    b, n, c = x.shape
    order, valid = gather_module.compact_order(mask)
    index = order.unsqueeze(-1).expand(-1, -1, c)
    out = fn(torch.gather(x, 1, index), key_padding_bias(valid, torch.float32))
    out = out * valid.unsqueeze(-1).to(out.dtype)
    return x + torch.zeros_like(x).scatter(1, index, out)


def _topk_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped order from TopK(longest) over the same key instead of a full sort."""
    n = mask.shape[1]
    longest = mask.sum(dim=1).max().item()
    torch._check(longest >= 1)
    torch._check(longest <= n)
    key = mask.to(torch.float32) * n + (n - 1 - torch.arange(n, device=mask.device, dtype=torch.float32))
    order = key.topk(longest, dim=1, sorted=True).indices
    return order, torch.gather(mask, 1, order)


def _sdpa_attention(attn: Attention, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    b, t, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if key_bias is None else key_bias.expand(-1, -1, t, -1)
    out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v, attn_mask=mask)
    return attn.proj(attn.norm(out.transpose(1, 2).reshape(b, t, c)))


FORMS: dict[str, list[tuple[Any, str, Any]]] = {
    "sort": [],
    "add": [(block_module, "sequence_added", functools.partial(gather_module.sequence_added, add_in_scatter=True))],
    "rows": [(gather_module, "compact_order", _topk_order)],
    "elements": [(gather_module, "compact_order", _topk_order), (block_module, "sequence_added", _elements)],
    "sdpa": [(gather_module, "compact_order", _topk_order), (block_module, "attention", _sdpa_attention)],
}
"""Each form as the module attributes it replaces (looked up at call time by the model code)."""


@contextlib.contextmanager
def form(name: str) -> Iterator[None]:
    """Make DyT blocks use form `name` while exporting."""
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in FORMS[name]]
    try:
        for module, attr, replacement in FORMS[name]:
            setattr(module, attr, replacement)
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def _exactness(backend: Backend, images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    batch = backend.run({"pixel_values": images})["logits"]
    single = np.concatenate([backend.run({"pixel_values": images[i:i + 1]})["logits"] for i in range(len(images))])
    scale = float(np.abs(reference).max())
    return {"vs_torch": float(np.abs(batch - reference).max()) / scale,
            "batch_vs_single": float(np.abs(batch - single).max()) / scale}


def _export_forms(out: Path, variant: str, forms: list[str],
                  dense: bool) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    """ONNX file per form (exported when missing; with `dense`, the dense export too, under
    "dense"), the image pool and PyTorch's logits on it."""
    pool = image_like(16, size=224, seed=1).numpy()
    model = init_model("vit_base_patch16_224", variant=variant, bottleneck=64, activation=0.5, seed=0)
    with torch.no_grad():
        reference = model.trace(torch.from_numpy(pool[:8])).logits.numpy()
    paths = {}
    for name in forms:
        paths[name] = out / f"{variant}-{name}.onnx"
        if not paths[name].exists():
            with form(name):
                export_onnx(model, paths[name], with_masks=True)
    if dense:
        paths["dense"] = out / f"{variant}-dense.onnx"
        if not paths["dense"].exists():
            export_onnx(model, paths["dense"], with_masks=True, dispatch="dense")
    return paths, pool, reference


def _peak_memory(runtime: str, paths: dict[str, Path], pool: np.ndarray, batch: int, threads: int,
                 options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    from validation.bench_memory import peak_memory

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        np.save(images, np.concatenate([pool] * -(-batch // len(pool)))[:batch])
        return {name: peak_memory(runtime, path, images, batch, threads, options=options)
                for name, path in paths.items()}


def run(args: argparse.Namespace) -> list[dict]:
    """Per runtime, every form is loaded and timed in turn (`validation.interleave`), then
    each one's peak memory is measured alone."""
    rows = []
    for variant in args.variants:
        paths, pool, reference = _export_forms(args.out, variant, args.forms, dense=bool(args.memory))
        forms = {name: paths[name] for name in args.forms}
        for runtime in [] if args.export_only else args.runtimes:
            if not args.memory_only:
                rows += _timed(variant, runtime, forms, pool, reference, args)
            for batch, pinned in itertools.product(args.memory, (False, True) if args.fixed_batch else (False,)):
                options = {"fixed_batch": batch} if pinned else None
                for name, peak in _peak_memory(runtime, paths, pool, batch, args.threads, options).items():
                    rows.append({"variant": variant, "form": name, "runtime": runtime, "memory_batch": batch,
                                 "fixed_batch": pinned, **peak})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _timed(variant: str, runtime: str, forms: dict[str, Path], pool: np.ndarray, reference: np.ndarray,
           args: argparse.Namespace) -> list[dict]:
    backends = {name: open_backend(runtime, path, threads=args.threads) for name, path in forms.items()}
    exact = {name: _exactness(backend, pool[:8], reference) for name, backend in backends.items()}
    ops = {name: summarize(path).dispatch_op_counts for name, path in forms.items()}  # reads each 350 MB file once
    rows = []
    for batch in (1, 8):
        contenders = {name: (name, False, backend) for name, backend in backends.items()}
        if args.fixed_batch:
            contenders |= {f"{name} (fixed batch)": (name, True, open_backend(runtime, path, threads=args.threads,
                                                                               fixed_batch=batch))
                           for name, path in forms.items()}
        timed = interleaved({key: backend for key, (_, _, backend) in contenders.items()}, pool, batch, args.rounds)
        for key, (name, pinned, backend) in contenders.items():
            checks = _same_as(backend, backends[name], pool[:batch]) if pinned else exact[name]
            rows.append({"variant": variant, "form": name, "runtime": runtime, "fixed_batch": pinned,
                         **timed[key].to_dict(), "ops": ops[name], **checks})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _same_as(pinned: Backend, dynamic: Backend, images: np.ndarray) -> dict[str, float]:
    """A pinned backend's logits against the dynamic one's on the same batch."""
    got, want = (b.run({"pixel_values": images})["logits"] for b in (pinned, dynamic))
    return {"max_rel_vs_dynamic": max_rel(got, want)}


def main(argv: list[str] | None = None) -> int:
    from dyt_export.cli.common import Parser
    from validation.cli import names_from, number, positive_ints, run_command

    p = Parser(prog="python -m validation.attention_forms", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the ONNX files and results.json")
    p.add_argument("--variants", type=names_from(("attn", "layer", "attn_mlp"), "variant"), default=["attn", "layer"],
                   help="attn,layer (default)")
    p.add_argument("--forms", type=names_from(tuple(FORMS), "form"), default=list(FORMS),
                   help=f"{','.join(FORMS)} (default: all)")
    p.add_argument("--runtimes", type=names_from(CPU_RUNTIMES, "runtime"), default=list(CPU_RUNTIMES),
                   help="ort-cpu,openvino (default)")
    p.add_argument("--export-only", action="store_true", help="only export the forms (needs no lock; timing does)")
    p.add_argument("--threads", type=number(int, 1), default=2)
    p.add_argument("--rounds", type=number(int, 1), default=5, help="timed passes over the 16-image pool per form")
    p.add_argument("--memory", type=positive_ints, default=[], help="batch sizes to measure peak memory at, e.g. 8,32")
    p.add_argument("--memory-only", action="store_true", help="with --memory: measure memory, not speed")
    p.add_argument("--fixed-batch", action="store_true",
                   help="also time (and with --memory measure) every form with the runtime pinned to the batch (fixed_batch)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    def body(args: argparse.Namespace) -> int:
        from validation.harness import check_output_dir, write_json

        if args.memory_only and not args.memory:
            raise UserError("--memory-only needs --memory B[,B]")
        check_output_dir(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = run(args)
        if rows:
            write_json(args.out / "results.json", rows)
        return 0

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())

"""Experiment: which ONNX form of "attention over each image's active tokens" runs fastest
while staying exact. Not a test; results and the decision are in docs/variants.md.

Every form compacts each image's active tokens to the front of its row, pads to the batch's
largest active count, masks padded keys, and scatters results back into zeros. They differ in
how (ONNX ops in brackets):

* `sort` (shipped, `dyt_export.model.gather.sequence_gathered`): flat row index [B*L] into
  [B*N, C] (Gather / ScatterND), order from a full sort of a unique key (TopK(N) + Slice);
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
the same runtime.

    .venv/bin/python -m validation.attention_forms --out /tmp/forms --runtimes      # export
    flock -x /tmp/dyt-bench.lock .venv/bin/python -m validation.attention_forms --out /tmp/forms
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

import dyt_export.model.block as block_module
import dyt_export.model.gather as gather_module
from dyt_export.calibrate import image_like
from dyt_export.export import export_onnx, summarize
from dyt_export.init_model import init_model
from dyt_export.model.gather import SeqFn, key_padding_bias
from runtimes import open_backend
from validation.interleave import interleaved


def _elements(x: torch.Tensor, mask: torch.Tensor, fn: SeqFn) -> torch.Tensor:
    b, n, c = x.shape
    order, valid = gather_module.compact_order(mask)
    index = order.unsqueeze(-1).expand(-1, -1, c)
    out = fn(torch.gather(x, 1, index), key_padding_bias(valid, torch.float32))
    out = out * valid.unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).scatter(1, index, out)


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
    "rows": [(gather_module, "compact_order", _topk_order)],
    "elements": [(gather_module, "compact_order", _topk_order), (block_module, "sequence_gathered", _elements)],
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


def _exactness(backend, images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    batch = backend.run({"pixel_values": images})["logits"]
    single = np.concatenate([backend.run({"pixel_values": images[i:i + 1]})["logits"] for i in range(len(images))])
    scale = float(np.abs(reference).max())
    return {"vs_torch": float(np.abs(batch - reference).max()) / scale,
            "batch_vs_single": float(np.abs(batch - single).max()) / scale}


def _export_forms(out: Path, variant: str, forms: list[str]) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    """ONNX file per form (exported when missing), the image pool and PyTorch's logits on it."""
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
    return paths, pool, reference


def run(out: Path, variants: list[str], forms: list[str], runtimes: list[str], threads: int,
        rounds: int) -> list[dict]:
    """Per runtime, every form is loaded and timed in turn (`validation.interleave`)."""
    rows = []
    for variant in variants:
        paths, pool, reference = _export_forms(out, variant, forms)
        for runtime in runtimes:
            backends = {name: open_backend(runtime, path, threads=threads) for name, path in paths.items()}
            exact = {name: _exactness(backend, pool[:8], reference) for name, backend in backends.items()}
            for batch in (1, 8):
                timed = interleaved(backends, pool, batch, rounds)
                for name in forms:
                    rows.append({"variant": variant, "form": name, "runtime": runtime, **timed[name].to_dict(),
                                 "ops": summarize(paths[name]).dispatch_op_counts, **exact[name]})
                    print(json.dumps(rows[-1]), flush=True)
            del backends
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the ONNX files and results.json")
    parser.add_argument("--variants", nargs="+", default=["attn", "layer"])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--runtimes", nargs="*", default=["ort-cpu", "openvino"],
                        help="none: only export (exports need no lock; timing does)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the 16-image pool per form")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.out, args.variants, args.forms, args.runtimes, args.threads, args.rounds)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

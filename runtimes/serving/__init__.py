"""Serving exported DyT models over HTTP on Ray Serve (`dyt-export serve`).

What this package owns: the Open Inference Protocol (KServe v2) with Triton's binary tensor
extension (`protocol`), the model facts a server needs from an ONNX file's `dyt.*` metadata
(`models`), cross-request batching on one runtime thread per model and replica
(`batching`), the image route (`images`), the Ray Serve deployment and its routes (`app`),
starting, printing and stopping a server (`launch`), and the `dyt-export serve` command line
(`command`, reached through the `dyt_export.commands` entry point).

What it may import: the runtime backends (`runtimes`), the exporter's light readers of what
a file records (`dyt_export.preprocess`, `dyt_export.export.metadata`, `dyt_export.config`,
`dyt_export.files`, errors) and the shared command-line helpers (`dyt_export.cli.common`). Never `validation`, never torch: a replica loads one ONNX file into one backend, and
the backend stays DyT-agnostic; DyT facts (dispatchers, preprocessing, labels) come from the
file's metadata only. Ray is imported by `batching`, `app` and `launch` alone, so protocol and
image handling can be used and tested without it.
"""

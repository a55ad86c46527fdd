"""edgert run-model: run any .onnx / .tflite model on inputs from .npy files; print its outputs, the
time per run and a per-op time table (ONNX Runtime's profiler; LiteRT: operators by type), and
write a Chrome trace."""
from __future__ import annotations

import numpy as np

from edgert.apps.common import device_threads, err, parser, ranged


def build_parser():
    p = parser("run-model", __doc__)
    p.add_argument("model", help=".onnx or .tflite file")
    p.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE",
                   help="an input as .npy (NAME= picks the input; without it, the next one in order) or a "
                        ".npz of several; inputs not given are random (said on stderr). Repeatable.")
    p.add_argument("-t", "--threads", type=ranged(int, 1), default=None,
                   help="threads (default: the --device profile's big + mid cores, else physical cores)")
    p.add_argument("--device", default=None, help="device profile whose thread count to use")
    p.add_argument("-r", "--repeat", type=ranged(int, 1), default=10, help="timed runs (after one untimed)")
    p.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome trace (chrome://tracing, Perfetto)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.npz", help="save the outputs of the last run")
    p.add_argument("--top", type=ranged(int, 0), default=10, help="slowest nodes to list (ONNX)")
    return p


def _stats(a):
    if a.dtype.kind in "fiub" and a.size:
        return f"min {a.min():.6g}  max {a.max():.6g}  mean {a.astype(np.float64).mean():.6g}"
    return ""


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from edgert.fileio import save_json, write_atomic
    from edgert.run_model import run_model
    from edgert.settings import default_threads
    threads = device_threads(args) or default_threads()
    r = run_model(args.model, args.input, threads, args.repeat)
    t = np.array(r.run_ms)
    print(f"{r.path}: {r.runtime}, {r.threads} threads, {len(t)} runs: {np.median(t):.3f} ms median "
          f"(min {t.min():.3f}, max {t.max():.3f})")
    for k, a in r.inputs.items():
        print(f"  input  {k}: {a.dtype} {list(a.shape)}")
    for k, a in r.outputs.items():
        a = np.asarray(a)
        print(f"  output {k}: {a.dtype} {list(a.shape)}  {_stats(a)}")
    if r.per_op_timed:
        print(f"\n{'op type':<32} {'nodes':>6} {'ms / run':>10} {'share':>7}")
        for op, n, ms, share in r.ops:
            print(f"{op:<32} {n:>6} {ms:>10.4f} {share:>6.1%}")
        if args.top:
            print(f"\n{'slowest nodes':<48} {'op type':<24} {'ms / run':>10}")
            for node, op, ms in r.nodes[:args.top]:
                print(f"{node[:48]:<48} {op[:24]:<24} {ms:>10.4f}")
    else:
        print(f"\n{'op type':<32} {'count':>6} {'share':>7}   (LiteRT's Python API times whole invokes only)")
        for op, n, _, share in r.ops:
            print(f"{op:<32} {n:>6} {share:>6.1%}")
    if args.trace:
        save_json(args.trace, {"traceEvents": r.trace, "displayTimeUnit": "ms"})
        err(f"run-model: wrote {args.trace}")
    if args.output:
        outs = {k: np.asarray(v) for k, v in r.outputs.items()}
        write_atomic(args.output, lambda f: np.savez(f, **outs), mode="wb")
        err(f"run-model: wrote {args.output}")
    return 0

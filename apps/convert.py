"""edgert convert: a GGUF model -> an edgert package (neuron clusters, thresholds, predictors; for
a mixture of experts, every expert at its own calibrated bit width), or (--to onnx) its dense
blocks as ONNX graphs for --backend onnx (docs/backends.md)."""
from __future__ import annotations

import argparse
import os

from edgert.apps.common import device_threads, err, is_tty, model_path, parser, setup_threads


def build_parser() -> argparse.ArgumentParser:
    p = parser("convert", __doc__)
    p.add_argument("model", help="source .gguf file or pulled model name")
    p.add_argument("-o", "--output", required=True,
                   help="package to write (*.edgert.gguf), or with --to onnx the directory to write")
    p.add_argument("--to", default="package", choices=("package", "onnx", "tflite"),
                   help="package: an edgert package (neuron cache); onnx: the dense blocks as ONNX graphs "
                        "with their quantised weights (MatMulNBits, GroupQueryAttention) and a manifest; "
                        "tflite: the same blocks through litert-torch (int8 dynamic quantisation; `make litert`)")
    p.add_argument("--ctx-size", type=int, default=1024,
                   help="--to tflite: the context the graphs are built for (TFLite shapes are static)")
    p.add_argument("--prefill-batch", type=int, default=32, help="--to tflite: tokens per prefill call")
    p.add_argument("--tflite-quant", default="int8", choices=("int8", "int8-weights", "int4", "fp16", "none"),
                   help="--to tflite: litert-torch's quantisation of the matrices (int8: channel-wise weights and "
                        "dynamic int8 activations; int8-weights: float activations; int4: blocks of 32)")
    p.add_argument("--activations", default="mixed", choices=("mixed", "f32", "int8"),
                   help="--to onnx: the activations of the graphs' matrix products: f32, int8 (ONNX Runtime "
                        "quantises them per block: fastest), or mixed: f32 for 4-bit weights, int8 for 8-bit "
                        "ones (ONNX Runtime's float path for 8-bit weights is slow)")
    p.add_argument("--calib", default=None,
                   help="calibration text file (default: the Python standard library's pydoc topics)")
    p.add_argument("--sparsity", type=float, default=0.3,
                   help="the recipe's FFN sparsity: the run-time default and the hot-to-cold order "
                        "(0.3: +0.6%% / +1.9%% perplexity on Qwen2.5-Coder-0.5B / 1.5B with the gate "
                        "selector, docs/neuron-cache.md)")
    p.add_argument("--levels", default="0.3,0.5,0.6,0.7,0.8",
                   help="comma-separated sparsities to calibrate thresholds for (selectable at run time)")
    p.add_argument("--rank", type=int, default=64, help="rank of the low-rank gate predictor")
    p.add_argument("--recall", type=float, default=0.9,
                   help="recall the predictor's thresholds are calibrated for (of the exact gate's active neurons)")
    p.add_argument("--down-type", default="Q8_0", choices=("Q8_0", "Q5_0"),
                   help="type of the re-laid-out down columns (Q5_0: 35%% fewer bytes per column than Q8_0)")
    p.add_argument("--cluster", type=int, default=0, help="neurons per cluster (0 = chosen from the row sizes)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens")
    p.add_argument("--device", default=None, help="device profile the package is made for: recorded in the "
                                                  "recipe; its big + mid cores set the threads")
    p.add_argument("--expert-types", default="Q2_K,Q3_K,Q4_K,Q8_0",
                   help="mixture of experts: the ggml types an expert may get (docs/experts.md)")
    p.add_argument("--expert-size", type=float, default=0.65,
                   help="mixture of experts: expected expert bytes read per token, as a fraction of every "
                        "expert at Q4_K; the bit widths are chosen by calibrated sensitivity under it")
    p.add_argument("--uniform-experts", default=None, metavar="TYPE",
                   help="mixture of experts: every expert at this one type instead (the baseline)")
    p.add_argument("-t", "--threads", type=int, default=None)
    return p


def default_calibration() -> tuple[str, str]:
    """English prose and code that ships with Python: pydoc_data.topics (about 465 KB)."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)), "pydoc_data.topics"


def export_onnx(src: str, args) -> int:
    from edgert.converters.onnx_export import export
    bar = []

    def progress(stage, n, total):
        if is_tty():
            if not bar:
                from tqdm import tqdm
                bar.append(tqdm(total=total, desc=stage, unit=" graphs", leave=True))
            bar[0].update(n - bar[0].n)
    try:
        m = export(src, args.output, acts=args.activations, progress=progress)
    finally:
        for b in bar:
            b.close()
    size = sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
    n_ffn = sum(1 for L in m["layers"] if L["ffn"])
    err(f"convert: wrote {args.output} ({size / 2**20:.1f} MiB): embedding, {m['n_layer']} attention blocks, "
        f"{n_ffn} FFN graphs, LM head; activations {m['activations']}")
    return 0


def _is_moe(path: str) -> bool:
    from edgert.config import config_from_gguf
    from edgert.gguf_file import GGUFFile
    g = GGUFFile(path)
    try:
        return config_from_gguf(g).moe
    finally:
        g.close()


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from edgert.errors import EdgertError
    from edgert.converters.package import convert
    setup_threads(device_threads(args))
    src = model_path(args.model)
    if args.to == "onnx":
        return export_onnx(src, args)
    if args.to == "tflite":
        from edgert.converters.tflite_export import export
        m = export(src, args.output, n_ctx=args.ctx_size, prefill_batch=args.prefill_batch, quant=args.tflite_quant)
        size = sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
        err(f"convert: wrote {args.output} ({size / 2**20:.1f} MiB): embedding, {m['n_layer']} attention blocks, "
            f"{m['n_layer']} FFN graphs, LM head; {m['quantization']}; context {m['n_ctx']}, prefill {m['prefill_batch']}")
        return 0
    if args.calib:
        try:
            with open(args.calib, encoding="utf-8") as f:
                text, name = f.read(), args.calib
        except (OSError, UnicodeDecodeError) as e:
            raise EdgertError(f"{args.calib}: cannot read calibration text ({e})") from None
    else:
        text, name = default_calibration()
    try:
        levels = [float(s) for s in args.levels.split(",") if s.strip()]
    except ValueError:
        raise EdgertError(f"--levels '{args.levels}': not a list of numbers") from None
    if not all(0 <= s < 1 for s in levels):
        raise EdgertError(f"--levels '{args.levels}': each sparsity must be in [0, 1)")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise EdgertError(f"{args.output}: directory {out_dir} does not exist")
    bars = {}

    def progress(stage, n, total):
        if not is_tty():
            return
        from tqdm import tqdm
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="B" if stage == "write" else "",
                               unit_scale=stage == "write", leave=True)
        b = bars[stage]
        b.update(n - b.n)
    if _is_moe(src):
        from edgert.converters.expert_bits import convert_experts
        recipe = convert_experts(src, args.output, text, name, types=[t for t in args.expert_types.split(",") if t],
                                 size=args.expert_size, uniform=args.uniform_experts,
                                 calib_tokens=max(args.calib_tokens, 512), progress=progress)
        for b in bars.values():
            b.close()
        err(f"convert: wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB): experts "
            f"{recipe['expert_types']}, expected expert reads {recipe['expert_bytes_read_per_token'] / 2**20:.2f} MiB "
            f"a token ({recipe['expert_bytes_read_per_token'] / recipe['expert_bytes_read_per_token_reference']:.0%} "
            f"of uniform Q4_K), calibrated on {recipe['calib_tokens']} tokens of {recipe['calib_name']}")
        return 0
    recipe = convert(src, args.output, text, name, sparsity=args.sparsity, levels=levels, rank=args.rank, device=args.device,
                     recall=args.recall, down_type=args.down_type, cluster=args.cluster, calib_tokens=args.calib_tokens, progress=progress)
    for b in bars.values():
        b.close()
    size = os.path.getsize(args.output)
    err(f"convert: wrote {args.output} ({size / 2**20:.1f} MiB): sparsity {recipe['sparsity']:g}, "
        f"{recipe['cluster_neurons']} neurons a cluster, predictor rank {recipe['predictor_rank']}, "
        f"calibrated on {recipe['calib_tokens']} tokens of {recipe['calib_name']}")
    return 0

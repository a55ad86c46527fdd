"""Run any ONNX or TFLite model: inputs from .npy files, outputs, a per-op time table and a Chrome
trace (edgert run-model).

ONNX files run in ONNX Runtime with its own profiler on (per node kernel times, the trace is its
Chrome-format JSON); TFLite files in ai-edge-litert's Interpreter (tflite-runtime as a fallback).
LiteRT's Python API has no per-operator profiler (its benchmark_model binary does), so a TFLite
run reports each invoke's time and the graph's operators by type, not time per operator.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgert.errors import EdgertError

log = logging.getLogger(__name__)


@dataclass
class ModelRun:
    path: str
    runtime: str                     # "onnxruntime 1.32.0" / "ai-edge-litert 2.3.0"
    threads: int
    inputs: dict                     # name -> array fed
    outputs: dict                    # name -> array of the last run
    run_ms: list                     # wall time of each timed run
    ops: list = field(default_factory=list)  # rows: (op type, count, total ms per run, share)
    nodes: list = field(default_factory=list)  # rows: (node name, op type, ms per run)
    per_op_timed: bool = False
    trace: list = field(default_factory=list)  # Chrome trace events


def _dtype_of(kind: str):
    """ONNX Runtime's 'tensor(float)' / a NumPy dtype -> NumPy dtype."""
    if kind.startswith("tensor("):
        t = kind[7:-1]
        table = {"float": np.float32, "double": np.float64, "float16": np.float16, "int64": np.int64,
                 "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
                 "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}
        if t not in table:
            raise EdgertError(f"input type {kind}: not supported by run-model")
        return np.dtype(table[t])
    return np.dtype(kind)


def load_inputs(specs: list[str], wanted: list[tuple[str, tuple, np.dtype]], model: str) -> dict:
    """--input specs (FILE.npy, NAME=FILE.npy, or one .npz holding every input) for the model's
    inputs [(name, shape with None for free dims, dtype)]; inputs not given are filled with
    reproducible random values (said in the log). Shapes and types are checked, naming the input."""
    given = {}
    for s in specs:
        name, _, f = s.rpartition("=") if "=" in s else ("", "", s)
        try:
            a = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise EdgertError(f"{f}: cannot read it as a .npy / .npz file ({str(e)[:200]})") from None
        if isinstance(a, np.lib.npyio.NpzFile):
            given.update({k: a[k] for k in a.files})
            continue
        if not name:
            free = [w[0] for w in wanted if w[0] not in given]
            if not free:
                raise EdgertError(f"--input {s}: {model} has no input left to give it to")
            name = free[0]
        given[name] = a
    names = [w[0] for w in wanted]
    for k in given:
        if k not in names:
            raise EdgertError(f"--input {k}: {model} has no input named {k!r} (its inputs: {', '.join(names)})")
    rng = np.random.default_rng(0)
    out = {}
    for name, shape, dtype in wanted:
        if name in given:
            a = given[name]
            if len(a.shape) != len(shape) or any(d is not None and d != n for d, n in zip(shape, a.shape)):
                raise EdgertError(f"input {name!r}: shape {list(a.shape)}, {model} expects "
                                  f"{['?' if d is None else d for d in shape]}")
            if a.dtype != dtype:
                if not np.can_cast(a.dtype, dtype, casting="same_kind"):
                    raise EdgertError(f"input {name!r}: {a.dtype} values, {model} expects {dtype}")
                a = a.astype(dtype)
            out[name] = a
            continue
        dims = [1 if d is None else d for d in shape]
        if dtype.kind == "f":
            out[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            out[name] = np.ones(dims, dtype)
        else:
            out[name] = rng.integers(0, 2, dims).astype(dtype)
        log.warning("input %r not given: random %s %s (free dimensions 1)", name, dtype, dims)
    return out


UPGRADE_OPSET = 17


def upgraded(path: str, why: str) -> bytes:
    """An old-opset model ONNX Runtime no longer implements, converted by onnx's version converter
    to opset 17 (said in the log); a one-line error when that fails too."""
    import onnx
    from onnx import version_converter
    try:
        m = onnx.load(path)
        old = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
        m = version_converter.convert_version(m, UPGRADE_OPSET)
        log.warning("%s: opset %d is not implemented by ONNX Runtime (%s); running it converted to opset %d",
                    path, old, why.split(":")[-1].strip()[:120], UPGRADE_OPSET)
        return m.SerializeToString()
    except Exception as e:
        raise EdgertError(f"{path}: ONNX Runtime cannot load it ({why}), and onnx's version converter "
                          f"cannot upgrade it ({str(e).splitlines()[0][:200]})") from None


def run_onnx(path: str, specs, threads: int, repeat: int) -> ModelRun:
    from edgert.backends import ort_module, plain_options
    ort = ort_module()
    so = plain_options(threads)
    so.enable_profiling = True
    so.log_severity_level = 3
    import tempfile
    tmp = tempfile.mkdtemp(prefix="edgert-ort-profile-")
    so.profile_file_prefix = os.path.join(tmp, "ort")
    try:
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).splitlines()[0][:300]
        if "NOT_IMPLEMENTED" not in first:
            raise EdgertError(f"{path}: ONNX Runtime cannot load it ({first})") from None
        s = ort.InferenceSession(upgraded(path, first), so, providers=["CPUExecutionProvider"])
    wanted = [(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), _dtype_of(i.type))
              for i in s.get_inputs()]
    feeds = load_inputs(specs, wanted, path)
    times, outs = [], None
    names = [o.name for o in s.get_outputs()]
    for _ in range(repeat + 1):  # the first run (allocations) is not timed
        t = time.perf_counter()
        try:
            outs = s.run(names, feeds)
        except Exception as e:
            raise EdgertError(f"{path}: the run failed in ONNX Runtime ({str(e).splitlines()[0][:300]})") from None
        times.append((time.perf_counter() - t) * 1e3)
    prof = s.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    r = ModelRun(path, f"onnxruntime {ort.__version__}", threads, feeds, dict(zip(names, outs)), times[1:],
                 per_op_timed=True, trace=events)
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    t_timed = runs[1] if len(runs) > 1 else 0  # node events of the untimed first run left out
    by_type, by_node = defaultdict(lambda: [0, 0.0]), defaultdict(float)
    node_type = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < t_timed:
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][:-len("_kernel_time")]
        by_type[op][1] += e["dur"] / 1e3
        by_node[node] += e["dur"] / 1e3
        node_type[node] = op
    counts = defaultdict(int)
    for node, op in node_type.items():
        counts[op] += 1
    total = sum(v[1] for v in by_type.values()) or 1.0
    r.ops = sorted(((op, counts[op], v[1] / repeat, v[1] / total) for op, v in by_type.items()), key=lambda x: -x[2])
    r.nodes = sorted(((n, node_type[n], ms / repeat) for n, ms in by_node.items()), key=lambda x: -x[2])
    return r


def litert_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
        import ai_edge_litert
        return Interpreter, f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '')}".strip()
    except ImportError:
        pass
    try:  # the old runtime (breaks under NumPy 2): only when LiteRT is missing
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except ImportError:
        raise EdgertError("a .tflite model needs ai-edge-litert: pip install 'edgert[tflite]'") from None


def tflite_ops(path: str) -> dict:
    """Operator type -> count over the model's subgraphs (LiteRT's flatbuffer schema)."""
    from ai_edge_litert import schema_py_generated as sch
    with open(path, "rb") as f:
        buf = f.read()
    m = sch.Model.GetRootAsModel(buf, 0)
    names = {v: k for k, v in vars(sch.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        codes.append(names.get(code, str(code)) if code != sch.BuiltinOperator.CUSTOM
                     else (oc.CustomCode() or b"CUSTOM").decode())
    out = defaultdict(int)
    for g in range(m.SubgraphsLength()):
        sg = m.Subgraphs(g)
        for j in range(sg.OperatorsLength()):
            out[codes[sg.Operators(j).OpcodeIndex()]] += 1
    return dict(out)


def run_tflite(path: str, specs, threads: int, repeat: int) -> ModelRun:
    Interpreter, name = litert_interpreter()
    try:
        it = Interpreter(model_path=path, num_threads=threads)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise EdgertError(f"{path}: LiteRT cannot load it ({str(e).splitlines()[0][:300]})") from None
    ins = it.get_input_details()
    wanted = [(d["name"], tuple(None if s < 0 else int(s) for s in d.get("shape_signature", d["shape"])),
               np.dtype(d["dtype"])) for d in ins]
    feeds = load_inputs(specs, wanted, path)
    for d in ins:
        a = feeds[d["name"]]
        if tuple(a.shape) != tuple(d["shape"]):
            it.resize_tensor_input(d["index"], a.shape)
    it.allocate_tensors()
    times, trace = [], []
    t0 = time.perf_counter()
    for rep in range(repeat + 1):
        for d in ins:
            it.set_tensor(d["index"], feeds[d["name"]])
        t = time.perf_counter()
        try:
            it.invoke()
        except (ValueError, RuntimeError) as e:
            raise EdgertError(f"{path}: the run failed in LiteRT ({str(e).splitlines()[0][:300]})") from None
        t1 = time.perf_counter()
        times.append((t1 - t) * 1e3)
        trace.append({"name": "invoke" if rep else "invoke (untimed first)", "cat": "run", "ph": "X",
                      "ts": (t - t0) * 1e6, "dur": (t1 - t) * 1e6, "pid": os.getpid(), "tid": 0})
    outs = {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}
    r = ModelRun(path, name, threads, feeds, outs, times[1:], trace=trace)
    counts = tflite_ops(path)
    n = sum(counts.values()) or 1
    r.ops = sorted(((op, c, None, c / n) for op, c in counts.items()), key=lambda x: -x[1])
    return r


def run_model(path: str, specs=(), threads: int = 1, repeat: int = 10) -> ModelRun:
    if not os.path.isfile(path):
        raise EdgertError(f"{path}: no such file")
    if repeat < 1:
        raise EdgertError("--repeat must be at least 1")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".tflite") or head[4:8] == b"TFL3":
        return run_tflite(path, list(specs), threads, repeat)
    if path.endswith(".onnx"):
        return run_onnx(path, list(specs), threads, repeat)
    raise EdgertError(f"{path}: not an .onnx or .tflite file")

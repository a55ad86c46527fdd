"""Desktop simulation: run the real computation on the host as if on a device.

The model is loaded under the device's memory budget (refused if it cannot fit), its weights read
with O_DIRECT through a FlashReader throttled to the device's flash curve, and decoded with the
device's thread count (capped at the host's cores). Two clocks per token: the host's measured
time, and the cost model's device time (edgert.costmodel) with its breakdown. The same cost model
evaluated for the host itself gives the check that it predicts what is measured.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from edgert.costmodel import Scale, predict_decode

log = logging.getLogger(__name__)


def decode_fixed(model, ids, n: int, before=None, after=None) -> np.ndarray:
    """Prefill ids, then n decode steps feeding back ids[-1] (no sampling, as llama-bench):
    seconds of each step [n]. before(i) runs untimed ahead of step i; after(i) runs inside its
    timing (what it costs is part of the step)."""
    model.reset()
    model.prefill(ids)
    t = np.empty(n)
    for i in range(n):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        model.decode_one_token(ids[-1])
        if after is not None:
            after(i)
        t[i] = time.perf_counter() - t0
    return t


def modelled_load_seconds(model, curve) -> float:
    """Flash time of reading the model's matrices in the loader's requests (chunks of up to
    CHUNK_ROWS rows) under a flash curve: the sum of the requests' service times at depth 1 (the
    loader's two requests in flight overlap a read with a repack, not two reads)."""
    from edgert.kernels.quant import CHUNK_ROWS
    total = 0.0
    for name, t in model.gguf.tensors.items():
        if len(t.shape) < 2:
            continue
        rb = t.nbytes // t.rows
        for r0 in range(0, t.rows, CHUNK_ROWS):
            total += curve.request_seconds((min(t.rows, r0 + CHUNK_ROWS) - r0) * rb, 1)
    return total


def simulate(model, ids, n: int, prof, host, threads: int, reps: int = 3, calibrate=None) -> dict:
    """-> {'host_measured': [n] s, 'host_model': [n] s, 'device_model': [n] s, 'device': breakdown
    at the middle position, 'host': breakdown, 'positions': [n], 'calibrations': [dict]}.

    A shared host's speed drifts by tens of percent over minutes, so each repetition first
    calibrates (calibrate() -> the cost model's figures, edgert.probes.op_costs) and then runs
    the decode; modelled and measured times are medians over the repetitions, each modelled
    from its own calibration."""
    pos = np.arange(len(ids), len(ids) + n)
    sc_host = Scale.for_device(host, host, threads)
    sc_dev = Scale.for_device(prof, host, threads)
    meas, host_m, dev_m, cals = [], [], [], []
    for _ in range(reps):
        cal = calibrate()
        cals.append(cal)
        meas.append(decode_fixed(model, ids, n))
        host_m.append([predict_decode(model, cal, sc_host, int(p))["total"] for p in pos])
        dev_m.append([predict_decode(model, cal, sc_dev, int(p))["total"] for p in pos])
    mid = int(pos[len(pos) // 2])
    return {"positions": pos, "host_measured": np.median(meas, axis=0),
            "host_model": np.median(host_m, axis=0), "device_model": np.median(dev_m, axis=0),
            "device": _median_breakdown(model, cals, sc_dev, mid),
            "host": _median_breakdown(model, cals, sc_host, mid), "scale": sc_dev, "calibrations": cals}


def _median_breakdown(model, cals, sc, pos) -> dict:
    """The modelled breakdown at pos, each component the median over the calibrations."""
    parts = [predict_decode(model, cal, sc, pos) for cal in cals]
    return {k: float(np.median([p[k] for p in parts])) for k in ("total", "compute", "memory", "fixed", "overlap", "bytes")}

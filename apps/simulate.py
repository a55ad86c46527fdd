"""edgert simulate -m MODEL --device NAME: run on this machine as if on the device.

Loads the model under the device's memory budget (refused with the numbers if it cannot fit),
reads its weights with O_DIRECT through the device's flash curve, decodes with the device's
thread count (capped at this machine's cores) and prints per token the host's measured time and
the modelled device time, with the breakdown (compute, memory traffic, fixed costs, flash,
overlap). The last line checks the cost model on the host itself: modelled vs measured.
"""
from __future__ import annotations

import argparse
import time

from edgert.apps.common import add_model_args, err, load, parser


def build_parser() -> argparse.ArgumentParser:
    p = parser("simulate", __doc__)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default="The history of the transistor begins", help="prompt text")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="decode tokens to simulate")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="runs per token position (median kept)")
    p.add_argument("--every", type=int, default=16, help="print every k-th token's row")
    return p


def predict(args) -> dict:
    """Load the model under the device's budget and flash curve, run the simulation; -> the
    simulation's result (edgert.simulate.simulate) with 'model', 'profile', 'threads', 'ids'."""
    from edgert.device_profiles.loader import load_profile
    from edgert.errors import EdgertError
    from edgert.probes import host_profile, op_costs
    from edgert.settings import default_threads
    from edgert.simulate import modelled_load_seconds, simulate
    if not args.device:
        raise EdgertError("simulate: which device? --device NAME (see `edgert devices`)")
    if args.n_predict < 1 or args.repetitions < 1:
        raise EdgertError("-n and -r must be at least 1")
    prof = load_profile(args.device)
    host = host_profile()
    threads = args.threads or min(prof.threads, default_threads())
    args.threads = threads
    args.direct_io = True
    args.throttle = None if prof.name == "host" else prof.flash
    err(f"device {prof.name}: {prof.description}")
    err(f"  runs with {threads} threads here (device: {prof.threads}), memory budget "
        f"{args.mem_budget or f'{prof.app_budget / 2**20:.0f} MiB (app share)'}, flash {prof.flash.kind}")
    t0 = time.perf_counter()
    model, tok = load(args)
    t_load = time.perf_counter() - t0
    ids = tok.encode(args.prompt, add_special=True)
    if len(ids) + args.n_predict > model.n_ctx:
        raise EdgertError(f"prompt ({len(ids)} tokens) + -n {args.n_predict} exceed the context of {model.n_ctx}")
    io = model.load_io
    err(f"  budget: {model.budget.summary()}")
    err(f"load: {io['bytes'] / 2**20:.1f} MiB of weights read ({io['mode']}, {io['requests']} requests) "
        f"in {io['wall_s'] * 1e3:.0f} ms here{' through the device flash curve' if args.throttle else ''}; "
        f"modelled device flash time {modelled_load_seconds(model, prof.flash) * 1e3:.0f} ms; "
        f"whole load {t_load * 1e3:.0f} ms")
    from edgert.gguf_file import type_name
    qtypes = tuple(sorted({type_name(w.qtype) for w in model._matrices()}))
    r = simulate(model, ids, args.n_predict, prof, host, threads, args.repetitions,
                 calibrate=lambda: op_costs(threads, refresh=True, stream_types=qtypes))
    r.update(model=model, profile=prof, threads=threads, ids=ids)
    return r


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from edgert.costmodel import MEM_EFFICIENCY
    r = predict(args)
    model, prof, ids = r["model"], r["profile"], r["ids"]
    print(f"\n{args.n_predict} decode tokens after a {len(ids)}-token prompt; ms per token "
          f"(median of {args.repetitions} runs, each after its own calibration)\n")
    print(f"| {'token':>5} | {'pos':>5} | {'host measured':>13} | {'host modelled':>13} | {'device modelled':>15} |")
    print(f"|{'-' * 6}:|{'-' * 6}:|{'-' * 14}:|{'-' * 14}:|{'-' * 16}:|")
    n = args.n_predict
    for i in list(range(0, n, max(1, args.every))) + ([n - 1] if (n - 1) % max(1, args.every) else []):
        print(f"| {i + 1:>5} | {r['positions'][i]:>5} | {r['host_measured'][i] * 1e3:>13.2f} | "
              f"{r['host_model'][i] * 1e3:>13.2f} | {r['device_model'][i] * 1e3:>15.2f} |")
    hm, hp, dm = r["host_measured"].mean(), r["host_model"].mean(), r["device_model"].mean()
    print(f"| {'mean':>5} | {'':>5} | {hm * 1e3:>13.2f} | {hp * 1e3:>13.2f} | {dm * 1e3:>15.2f} |")
    d, sc = r["device"], r["scale"]
    print(f"\ndevice {prof.name}, modelled per token at the middle position: {d['total'] * 1e3:.2f} ms "
          f"({1 / d['total']:.1f} tok/s) = compute {d['compute'] * 1e3:.2f} + memory traffic "
          f"{d['memory'] * 1e3:.2f} ({d['bytes'] / 1e6:.1f} MB at {sc.bandwidth / 1e9:.1f} GB/s) + fixed "
          f"costs and interpreter {d['fixed'] * 1e3:.2f} + flash 0.00 - overlap {d['overlap'] * 1e3:.2f}")
    if not model.stats.bytes_read:
        print(f"  flash during decode: 0 bytes (ffn {model.placement.ffn}: every weight resident)")
    else:  # measured on this host; the device's flash time is not in the model above
        print(f"  flash during decode: {model.stats.as_dict()['bytes_read_per_token'] / 2**20:.2f} MiB a token "
              f"measured here (ffn {model.placement.ffn}); its device flash time is not modelled (flash 0.00)")
    if prof.name != "host":
        print(f"  scaling from this host: kernel work x{sc.compute:.2f} (peak vector throughput of the cores "
              f"used), fixed costs x{sc.fixed:.2f} (clock of the fastest core), memory at "
              f"{MEM_EFFICIENCY:.0%} of {prof.mem_bandwidth / 1e9:.1f} GB/s")
    print(f"cost model check on this host: modelled {hp * 1e3:.2f} ms vs measured {hm * 1e3:.2f} ms per token "
          f"({(hp / hm - 1) * 100:+.1f}%)")
    return 0

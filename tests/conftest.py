"""Test configuration: hypothesis profiles, the interpreter, the ``gpu`` marker.

"default" is derandomised, so every run (and CI) checks the same examples; set
HYPOTHESIS_PROFILE=explore to draw new ones.

Tests marked ``gpu`` run the compiled kernels on CUDA tensors (in their own process: this
one has Triton in interpreter mode); they are skipped where CUDA is absent. ``pytest -m
gpu`` runs only them, ``pytest -m "not gpu"`` everything else.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("default", derandomize=True, database=None, **_common)
settings.register_profile("explore", derandomize=False, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import sys  # noqa: E402

import pytest  # noqa: E402

# Triton decorates its own language functions when it is first imported, and its CPU
# interpreter works only if TRITON_INTERPRET=1 was set before that: it is set here, before
# any test imports triton. Only the tests that ask for the ``triton_interpret`` fixture keep
# it; every other test runs with it unset, so there the Triton backend stays unusable on CPU
# ("auto", the benchmark providers) and nothing else runs the slow interpreter.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
    try:  # imported now, so no later test (with the variable unset) imports it compiled
        import triton  # noqa: F401
    except ImportError:
        pass
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _triton_interpret_only_when_asked(request, monkeypatch):
    if "triton_interpret" not in request.fixturenames:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run the Triton backend in Triton's CPU interpreter for one test: the vtome ops'
    CPU dispatch key is lent to the Triton kernels (vtome_kernels.triton.cpu_interpreter)."""
    pytest.importorskip("triton")
    if not _INTERPRET_AT_IMPORT:
        pytest.fail("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vtome_kernels.triton import backend

    with backend.cpu_interpreter():
        why = backend.supports("cpu")
        assert why is None, why
        yield backend


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: compiled Triton kernels on CUDA tensors (needs a GPU)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton kernels)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

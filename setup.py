"""The one build entry of vtome_kernels (metadata lives in pyproject.toml).

Builds the C++ CPU backend ``vtome_kernels._C`` with CMake + Ninja against the torch
already installed (``pip install --no-build-isolation``). ``VTOME_NO_EXT=1`` gives a
pure-Python install: the "cpp" backend then reports itself unavailable and "auto" uses the
reference.
"""

import os
import pathlib
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt lists (setuptools compiles nothing)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt with Ninja, the module landing where setuptools wants it."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
        build = pathlib.Path(self.build_temp).resolve() / "cmake"
        build.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
        cfg = [
            _cmake(), "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DTORCH_PREFIX={pathlib.Path(torch.__file__).parent}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DCMAKE_MAKE_PROGRAM={_ninja()}",
        ]
        subprocess.run(cfg, check=True)
        subprocess.run([_cmake(), "--build", str(build), "-j", jobs], check=True)
        built = next(out.parent.glob("_C*.so"), None)
        if built is None or not built.exists():
            raise RuntimeError(f"CMake built no module into {out.parent}")
        if built != out:
            built.replace(out)


def _cmake() -> str:
    try:
        import cmake

        return str(pathlib.Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return "cmake"


def _ninja() -> str:
    try:
        import ninja

        return str(pathlib.Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return "ninja"


if os.environ.get("VTOME_NO_EXT", "") not in ("", "0"):
    setup()
else:
    setup(ext_modules=[CMakeExtension("vtome_kernels._C")], cmdclass={"build_ext": CMakeBuild})

"""The one build entry of vtome_kernels (metadata lives in pyproject.toml)."""

from setuptools import setup

setup()

"""Benchmarks of vtome_kernels: the main job (``python -m benchmarks``) and pytest-benchmark
suites (``pytest benchmarks``). See BENCHMARKS.md for the results and how to read them."""

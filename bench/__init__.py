"""thinkfuse benchmarks: ``python -m bench --help``.

Shared machinery (timing, device peaks, memory, reports, CLI) lives in ``bench.harness``.
Every other module here whose name does not start with an underscore is an op module: it
exposes ``cases(config) -> list[harness.Case]`` and is found by name, so adding an op is one
new file (see ``bench/rms_norm.py`` for the pattern).
"""

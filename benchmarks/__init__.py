"""Benchmarks of mlsae-lens' training, harvest and analysis against their floors.

Run ``python -m benchmarks`` (full, writes ``benchmarks/results.md`` and the scaling plot) or
``python -m benchmarks --quick --json`` (under a minute on 2 CPU cores). Every ratio compares two
measurements taken in the same process on the same machine; absolute times are context only.
"""

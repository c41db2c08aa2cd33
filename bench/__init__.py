"""Benchmarks for vmae-ray: corpus generator, peer implementations and the `make bench` driver.

`python -m bench.run --workdir bench_out --results BENCHMARKS.md` runs everything; see
BENCHMARKS.md for what is measured and how.
"""

"""Benchmarks for hubcore and hubserver, side by side with peer implementations.

Run ``python -m bench --help`` for the profiles. ``bench/core`` holds the
loop-free ones (seeded encode and decode throughput), ``bench/server`` the ones
that drive a real server over loopback.
"""

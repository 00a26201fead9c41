"""Benchmarks of training and sampling throughput (python -m bench.throughput); the kernel's is fused/bench.py."""

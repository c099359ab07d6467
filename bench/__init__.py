"""Benchmark scripts for HEFT Studio (throughput, paper reproduction, GPU check). See bench/README.md."""

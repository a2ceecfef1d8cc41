"""Benchmarks of mlodsl against Betty, higher, TorchOpt and hand-written floors (see README.md)."""

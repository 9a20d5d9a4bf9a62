"""The ``kvfabric`` command line: offline generation, the serving topology, benchmarks."""

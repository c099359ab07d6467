"""``python -m bench.throughput``: the command line in ``bench.throughput.cli``."""
from bench.throughput.cli import main

main()

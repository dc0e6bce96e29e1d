"""Run the core benchmark: python benchmarks/bench_core.py [--quick] [--device cpu|cuda]."""
from torchddn.bench.core import main

if __name__ == "__main__":
    main()

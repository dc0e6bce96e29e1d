"""Run the fixed_point benchmark: python benchmarks/bench_fixed_point.py [--quick] [--device cpu|cuda]."""
from torchddn.bench.fixed_point import main

if __name__ == "__main__":
    main()

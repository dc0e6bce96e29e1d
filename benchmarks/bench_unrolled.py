"""Run the unrolled benchmark: python benchmarks/bench_unrolled.py [--quick] [--device cpu|cuda]."""
from torchddn.bench.unrolled import main

if __name__ == "__main__":
    main()

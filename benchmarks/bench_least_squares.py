from torchddn.bench.least_squares import main

main()

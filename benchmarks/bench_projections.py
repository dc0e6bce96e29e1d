from torchddn.bench.projections import main

main()

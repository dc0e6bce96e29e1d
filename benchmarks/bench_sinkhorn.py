from torchddn.bench.sinkhorn import main

main()

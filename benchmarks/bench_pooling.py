from torchddn.bench.pooling import main

main()

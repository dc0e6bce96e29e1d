from torchddn.bench.qp import main

main()

from torchddn.bench.pointnet import main

main()

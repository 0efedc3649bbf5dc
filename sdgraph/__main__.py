from sdgraph.cli import main

main()

from hhbench.cli.app import main

main()

from ipyparallel_lite.engine.app import main

main()

from ipyparallel_lite.controller.app import main

main()

from csi_async.cli import main

main()

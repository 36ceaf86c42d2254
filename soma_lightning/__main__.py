from soma_lightning.cli import main

main()

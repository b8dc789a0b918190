from imageprov.cli.main import main

main()

from imageprov.cli import main

main()

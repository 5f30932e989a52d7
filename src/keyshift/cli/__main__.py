from keyshift.cli.main import main

main()

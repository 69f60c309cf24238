from vmferry.cli.main import main

main()

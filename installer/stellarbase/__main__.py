from stellarbase.cli import main

main()

"""The verbs: one module per verb or verb group, each function returns one `Result`.

`stellarbase.cli` parses the command line and calls these; `stellarbase.cli.main` alone
turns their results and errors into output and an exit status.
"""

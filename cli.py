"""`python cli.py ...` from a checkout runs the same Typer app as the installed `pkd` command."""

from pkd.cli import main

if __name__ == "__main__":
    main()

"""`python -m worldlm_secure.cli ...` runs the command line (used by tests that need a real process)."""

from worldlm_secure.cli import main

main()

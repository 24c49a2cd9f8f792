"""The functions behind convert.py's subcommands (one file each)."""

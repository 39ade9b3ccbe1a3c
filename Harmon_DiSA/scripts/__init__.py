"""Harmon command lines: ``python scripts/<name>.py`` from ``Harmon_DiSA/`` or ``-m harmon_disa.scripts.<name>``."""

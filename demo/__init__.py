"""The end-to-end demo behind ``make demo`` (``python -m demo``); see ``demo/__main__.py``."""

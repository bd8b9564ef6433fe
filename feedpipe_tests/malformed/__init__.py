"""The malformed-input corpus: see `cases.py`."""

"""The bad-input matrix, one module per command (see ``conftest.py``)."""

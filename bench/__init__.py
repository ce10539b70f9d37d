"""The benchmark (bench/README.md): `python bench/run.py` runs it; its parts live here."""

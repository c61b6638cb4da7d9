"""`python -m bench` / `make bench`: the end-to-end benchmark on this machine (tansu + sandbox over loopback).

Not part of `make test`. See `bench/harness.py` for what is measured and how.
"""

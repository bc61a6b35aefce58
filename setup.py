"""Build shim for tools that look for setup.py; everything is configured in pyproject.toml.

    pip install -e .          # the usual way (reads pyproject.toml)
    python setup.py develop   # older tooling, same result
"""
from setuptools import setup

setup()

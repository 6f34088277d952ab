"""Packaging lives in pyproject.toml; this file exists for the optional ahead-of-time build hook."""

from setuptools import setup

setup()

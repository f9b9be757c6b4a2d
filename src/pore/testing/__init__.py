"""Builders of tiny models of the real architectures and of the synthetic spatial benchmark.

They make the embedded checkpoint and benchmark (assets/) and the models the tests run on; nothing in the
library imports them.
"""

"""Merging: config -> plan (headers only) -> statistics -> per-tensor run -> writer.

Importing this package registers every merge method of ``methods/`` (each module registers itself by
name), so ``registry.get_method`` knows them all whichever module of the package is imported first.
"""

from modelcypher.merging import methods  # noqa: F401

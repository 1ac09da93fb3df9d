"""Every public module in this package registers one merge method; importing the package registers all.
Modules named ``_*`` hold shared pieces and are imported by the methods that use them (the compiled
loops of ``_numba_loops`` only when first needed: importing numba takes a quarter of a second)."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

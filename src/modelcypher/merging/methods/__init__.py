"""Every public module in this package registers one merge method; importing the package registers all.
Modules named ``_*`` hold shared pieces and are imported by the methods that use them."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

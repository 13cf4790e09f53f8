"""Import paths of modules renamed in 0.3, kept working: ``mergekit_fisher_mask.calibrate.*`` (now
``calibration``; ``mergekit_fisher_mask.calibrate`` itself is the :func:`calibrate` function) and
``mergekit_fisher_mask.merge.heads`` (now ``merge.task_heads``).

Each old name is an entry in ``sys.modules`` for the module object of the new name, so both names import the same
module, and importing an old name never replaces the package's ``calibrate`` function.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

_RENAMED_PACKAGES = {"mergekit_fisher_mask.calibrate": "mergekit_fisher_mask.calibration"}
_RENAMED_MODULES = {"mergekit_fisher_mask.merge.heads": "mergekit_fisher_mask.merge.task_heads"}


def alias_renamed_modules() -> None:
    for old, new in _RENAMED_PACKAGES.items():
        package = importlib.import_module(new)
        sys.modules.setdefault(old, package)
        for module in pkgutil.iter_modules(package.__path__):
            sys.modules.setdefault(f"{old}.{module.name}", importlib.import_module(f"{new}.{module.name}"))
    for old, new in _RENAMED_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))

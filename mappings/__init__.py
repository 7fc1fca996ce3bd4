"""TF checkpoint variable name -> PyTorch state_dict key tables, generated from rules.

Names are imported on first use (PEP 562): the rules are plain data, the tables need torch,
and the command lines read the rules (ignore list) without loading torch for ``--help``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rules import IGNORED_TF, PT_ONLY, Layout, Rule, ignore_reason
    from .table import MappingEntry, mapping_table, table_for, tf_to_pt

_LAZY = {"IGNORED_TF": ".rules", "PT_ONLY": ".rules", "Layout": ".rules", "Rule": ".rules",
         "ignore_reason": ".rules", "MappingEntry": ".table", "mapping_table": ".table",
         "table_for": ".table", "tf_to_pt": ".table"}

__all__ = ["IGNORED_TF", "PT_ONLY", "Layout", "Rule", "MappingEntry", "ignore_reason",
           "mapping_table", "table_for", "tf_to_pt"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mappings' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)

"""TF checkpoint variable name -> PyTorch state_dict key tables, generated from rules."""
from .rules import IGNORED_TF, PT_ONLY, Layout, Rule, ignore_reason
from .table import MappingEntry, mapping_table, table_for, tf_to_pt

__all__ = ["IGNORED_TF", "PT_ONLY", "Layout", "Rule", "MappingEntry", "ignore_reason",
           "mapping_table", "table_for", "tf_to_pt"]

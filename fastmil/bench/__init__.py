"""Reading, comparing and reporting pytest-benchmark results (``make bench``, ``fastmil bench compare``)."""
from .compare import Change, compare_runs, format_changes
from .report import write_report
from .results import Case, load_cases

__all__ = ["Case", "Change", "compare_runs", "format_changes", "load_cases", "write_report"]

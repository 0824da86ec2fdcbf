"""Straightforward torch implementations the way research code writes them: what fastmil is measured against.

Each is an independent, readable implementation of the same algorithm (not fastmil code with features removed);
``make bench`` times them beside fastmil's version in the same run.
"""

"""fastmil.ops"""

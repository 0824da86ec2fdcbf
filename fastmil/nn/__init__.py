"""fastmil.nn"""

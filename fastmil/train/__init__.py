"""fastmil.train"""

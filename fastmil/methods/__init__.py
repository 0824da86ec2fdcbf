"""fastmil.methods"""

"""LM Compression Lab engine: load causal LMs, compress them (quantize, prune, distill) and measure honestly.

This package never imports streamlit; the app in app.py and pages/ is a thin layer over it.
"""

"""Workstation side of nomoat: load, merge, plan, fit, export, verify, package.

Heavy libraries (torch, transformers, onnx) are imported inside the functions that
need them, so `nomoat --help` stays fast.
"""

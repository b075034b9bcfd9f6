"""Backbones shipped inside the package, and the scripts that build them."""

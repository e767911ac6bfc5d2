"""Triton python-backend model templates, shipped as package data so that `cmc export`
finds them in a wheel install as well as in a checkout (see README.md here)."""

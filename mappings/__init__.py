"""Declarative key maps and variant tables (data, shipped inside the wheel)."""

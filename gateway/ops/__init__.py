"""Operator side: per-process metrics and their aggregation and exposition."""

"""Builders of the tiny family pipelines; services.demo.tiny_families is the way in."""

"""Parity harness: record the JAX reference on synthetic tasks, replay our runtime, compare step by step."""

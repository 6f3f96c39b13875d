"""Flax building blocks shared by the methods."""

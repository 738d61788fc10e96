"""Minimal variants of the count map (BPF C) and their loaders, for the overhead benchmark."""

"""Helpers that build test and benchmark inputs (synthetic checkpoints). Not used by the pipeline itself."""

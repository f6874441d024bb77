"""Prompt sources: the synthetic arithmetic task and local JSONL/Parquet datasets."""

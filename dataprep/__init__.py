"""Corpus readers, dedup, filters, mixing, tokenization and the shard writer; nothing of training."""

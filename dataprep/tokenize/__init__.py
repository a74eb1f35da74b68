"""Tokenizer (train a byte-level BPE or load one), document encoding, and packing into fixed-length rows."""

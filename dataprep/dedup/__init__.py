"""Exact dedup by text hash and MinHash-LSH near-duplicate clustering, both over Ray Data shuffles."""

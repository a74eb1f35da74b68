"""Final outputs: the Arrow shards with their manifest, and the report."""

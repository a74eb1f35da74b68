"""Model, tensor/pipeline/data parallel composition, ZeRO, loader, train loop and checkpoints; no Ray here."""

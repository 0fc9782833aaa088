"""Data layer: read, tokenise, pack and stream training text and chat data (docs/formats.md)."""

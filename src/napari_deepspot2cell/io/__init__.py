"""Readers and writers: slides, cell masks, spot data, atomic outputs."""

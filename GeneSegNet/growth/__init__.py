"""Cells from their transcripts: labels grown into the territory their transcripts support,
and each training round's labels merged with the previous round's (no collapse)."""

"""Reusable network blocks; no model wiring and no schedule math."""

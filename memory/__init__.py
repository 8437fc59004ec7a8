"""Conversation memory (see `memory.Store`)."""

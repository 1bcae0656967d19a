"""A cluster member: lock names, glocks, coherence, open modes and deletion, per-operation lock plans, joining and recovery."""

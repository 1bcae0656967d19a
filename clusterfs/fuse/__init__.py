"""The FUSE layer: the thin operations translation, the mount sequences and the serve loop."""

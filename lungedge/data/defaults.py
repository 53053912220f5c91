"""Defaults of the data commands, in a module without heavy imports, so ``lungedge data --help``
shows them without loading NumPy (the library modules import them from here)."""

DEFAULT_THRESHOLD = 0.88  # correlation above which two images are near-duplicates
LOOSE_THRESHOLD = 0.80  # a second, more sensitive look used by the audit
SPLITS = ("train", "val", "test")
GROUP_BY = ("near-duplicate", "none")

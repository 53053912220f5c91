"""The release gate's default limits, in points (no imports, so the CLI's --help stays light)."""

MAX_BACC_DROP_POINTS = 1.0  # balanced accuracy may drop at most this much (judged on the interval's bound)
MAX_SENS_DROP_POINTS = 2.0  # each class's sensitivity likewise

"""lungedge: lung-image classifiers from training to a Jetson.

Importing the package is cheap: heavy libraries (torch, tensorflow, onnxruntime)
are imported only inside the functions that need them, and always torch first.
"""

__version__ = "0.1.0"

"""MedVL-SAM2: a plug-in framework for 3D medical vision-language models.

Importing this package is cheap; heavy libraries load when a plugin is built.
"""

__version__ = "0.1.0"

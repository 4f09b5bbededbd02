"""Example MedVL-SAM2 plugin package (see ``hooks.py`` for the registration)."""

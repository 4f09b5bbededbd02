"""Hook implementations: how this package tells MedVL-SAM2 what it provides.

Targets are ``"module:attr"`` strings, so nothing below is imported until a user builds it.
"""

from medvlsam2.core.hookspecs import hookimpl


@hookimpl
def register_encoders(register):
    register(
        "simple_cnn3d",
        "medvlsam2_plugin_example.encoder:SimpleCNN3DEncoder",
        summary="A small strided 3D CNN (example plugin)",
    )


@hookimpl
def register_tasks(register):
    register(
        "volume_classification",
        "medvlsam2_plugin_example.task:VolumeClassificationTask",
        summary="Whole-volume classification from a CSV of image,label (example plugin)",
    )

"""Dataset readers (``data_formats`` plugins), preprocessing presets and volume loading.

Readers are registered by name in ``registry.yaml`` (``nifti_json``, ``m3d_cap``, ``m3d_vqa``,
``m3d_seg``, ``m3d_refseg``) and built with ``build("data_formats", name, {...})``. Importing this
package stays light: MONAI and torch load when a volume is read.
"""

from medvlsam2.plugins.tasks.data.base import DatasetReader, ReaderConfig, Sample, load_volume, resolve_under

__all__ = ["DatasetReader", "ReaderConfig", "Sample", "load_volume", "resolve_under"]

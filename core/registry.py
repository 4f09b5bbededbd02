"""Plugin registry: the ``PluginHost`` facade over pluggy and the typed ``Registrar``.

Nothing is imported when plugins are listed: a registration names its object as
``"module:attr"`` and the module is imported only when the plugin is built or shown.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from medvlsam2 import __version__
from medvlsam2.core import hookspecs
from medvlsam2.core.errors import PluginError, did_you_mean

KINDS = ("encoders", "projectors", "llms", "decoders", "tasks", "data_formats")
ENTRY_POINT_GROUP = "medvlsam2"
BUILTIN_PROVIDER = "medvlsam2"

_SINGULAR = {kind.rstrip("s"): kind for kind in KINDS} | {"data_format": "data_formats"}


def normalize_kind(kind: str) -> str:
    """``encoder`` / ``encoders`` -> ``encoders``; unknown kinds raise ``PluginError``."""
    key = kind.strip().lower().replace("-", "_")
    key = _SINGULAR.get(key, key)
    if key not in KINDS:
        raise PluginError(f"unknown plugin kind '{kind}'{did_you_mean(key, KINDS)}; kinds: {', '.join(KINDS)}")
    return key


@dataclass(frozen=True)
class PluginSpec:
    """One registered plugin. ``target`` is ``"module:attr"`` or the object itself."""

    kind: str
    name: str
    target: str | Any
    summary: str
    provider: str
    version: str

    @property
    def target_name(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{getattr(self.target, '__qualname__', repr(self.target))}"

    def load(self) -> Any:
        """Import and return the plugin object (a class or factory)."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr) if attr else module
        except (ImportError, AttributeError) as err:
            raise PluginError(
                f"{self.kind[:-1]} plugin '{self.name}' from '{self.provider}' cannot be loaded "
                f"from {self.target}: {type(err).__name__}: {err}"
            ) from err

    def config_class(self) -> type | None:
        return getattr(self.load(), "config_class", None)


class Registrar:
    """The ``register`` callback a hook receives; bound to one kind and one provider."""

    def __init__(self, host: PluginHost, kind: str, provider: str, version: str) -> None:
        self._host, self.kind, self.provider, self.version = host, kind, provider, version

    def __call__(
        self,
        name: str,
        target: str | Callable[..., Any] | type,
        *,
        summary: str = "",
        replace: bool = False,
    ) -> None:
        """Register ``name`` -> ``target`` (``"module:attr"`` keeps the import lazy).

        A name that another provider already registered is an error unless ``replace=True``.
        """
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.provider}: a {self.kind[:-1]} plugin was registered without a name")
        if isinstance(target, str) and ":" not in target:
            raise PluginError(
                f"{self.provider}: {self.kind[:-1]} '{name}' target must be 'module:attr', got '{target}'"
            )
        if not summary and not isinstance(target, str):
            summary = (getattr(target, "__doc__", "") or "").strip().split("\n")[0]
        spec = PluginSpec(self.kind, name, target, summary, self.provider, self.version)
        self._host._add(spec, replace=replace)


class PluginHost:
    """Loads the built-in and installed plugins and answers every registry question.

    Environment variables:
      * ``MEDVLSAM2_LOAD_PLUGINS``: comma-separated distributions allowed to provide plugins
        (built-ins always load). Unset: every installed distribution in the entry-point group.
      * ``MEDVLSAM2_DISABLE_PLUGINS``: comma-separated distributions never loaded.
      * ``MEDVLSAM2_TRACE_PLUGINS=1``: print every hook call to stderr.
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        env: Mapping[str, str] | None = None,
        extra: Sequence[tuple[object, str, str]] = (),
    ) -> None:
        """``extra``: ``(hook_module_or_object, provider, version)`` registered like entry points
        (for notebooks and tests that provide plugins without installing a distribution)."""
        self._env = os.environ if env is None else env
        self._extra = list(extra)
        self._use_entry_points = entry_points
        self._specs: dict[str, dict[str, PluginSpec]] | None = None
        self.failures: list[tuple[str, str]] = []
        self._failed: set[str] = set()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # -- loading ------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, PluginSpec]]:
        if self._specs is not None:
            return self._specs
        self._specs = {kind: {} for kind in KINDS}
        if self._env.get("MEDVLSAM2_TRACE_PLUGINS", "") not in ("", "0"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        from medvlsam2.core import builtin

        providers: list[tuple[object, str, str]] = [(builtin, BUILTIN_PROVIDER, __version__)]
        self.pm.register(builtin, name=BUILTIN_PROVIDER)
        if self._use_entry_points:
            providers.extend(self._load_entry_points())
        for plugin, provider, version in self._extra:
            self.pm.register(plugin, name=provider)
            providers.append((plugin, provider, version))
        self.pm.check_pending()
        for kind in KINDS:
            for plugin, provider, version in providers:
                if provider in self._failed:
                    continue
                others = [p for p, _, _ in providers if p is not plugin]
                hook = self.pm.subset_hook_caller(f"register_{kind}", remove_plugins=others)
                try:
                    hook(register=Registrar(self, kind, provider, version))
                except Exception as err:
                    if provider == BUILTIN_PROVIDER or isinstance(err, PluginError):
                        raise
                    self._fail(provider, err)
        return self._specs

    def _allowed(self, dist: str) -> bool:
        def names(var: str) -> set[str]:
            return {n.strip().lower() for n in self._env.get(var, "").split(",") if n.strip()}

        allow, block = names("MEDVLSAM2_LOAD_PLUGINS"), names("MEDVLSAM2_DISABLE_PLUGINS")
        key = dist.lower()
        return key not in block and (not allow or key in allow)

    def _load_entry_points(self) -> list[tuple[object, str, str]]:
        found: list[tuple[object, str, str]] = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            if dist.lower() == BUILTIN_PROVIDER or not self._allowed(dist):
                continue
            try:
                module = ep.load()
                if self.pm.is_registered(module):
                    continue
                self.pm.register(module, name=f"{dist}:{ep.name}")
            except Exception as err:  # a broken plugin must not break unrelated commands
                self._fail(dist, err)
                continue
            found.append((module, dist, version))
        return found

    def _fail(self, dist: str, err: BaseException) -> None:
        message = f"{type(err).__name__}: {err}"
        self.failures.append((dist, message))
        self._failed.add(dist)
        print(f"medvlsam2: plugin distribution '{dist}' failed to load: {message}", file=sys.stderr)

    def _add(self, spec: PluginSpec, *, replace: bool) -> None:
        table = self._specs[spec.kind]  # type: ignore[index]
        old = table.get(spec.name)
        if old is not None and not replace:
            raise PluginError(
                f"duplicate {spec.kind[:-1]} name '{spec.name}': registered by '{old.provider}' "
                f"({old.target_name}) and by '{spec.provider}' ({spec.target_name}); "
                "pass replace=True to override on purpose"
            )
        table[spec.name] = spec

    # -- queries ------------------------------------------------------------------------
    def specs(self, kind: str) -> dict[str, PluginSpec]:
        return dict(self._load()[normalize_kind(kind)])

    def all_specs(self) -> list[PluginSpec]:
        return [spec for kind in KINDS for spec in self._load()[kind].values()]

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        return sorted(n for n in self.specs(kind) if fnmatch.fnmatchcase(n, pattern))

    def get(self, kind: str, name: str) -> PluginSpec:
        kind = normalize_kind(kind)
        table = self._load()[kind]
        if name not in table:
            available = ", ".join(sorted(table)) or "none"
            raise PluginError(
                f"unknown {kind[:-1]} '{name}'{did_you_mean(name, table)}; available {kind}: {available}"
            )
        return table[name]

    def build(self, kind: str, name: str, args: Mapping[str, Any] | None = None, *, path: str = "") -> Any:
        """Build plugin ``name`` of ``kind`` with ``args`` validated against its config class."""
        from medvlsam2.core.config import make_plugin_config

        spec = self.get(kind, name)
        target = spec.load()
        config_cls = getattr(target, "config_class", None)
        if config_cls is None:
            return target(**dict(args or {}))
        return target(make_plugin_config(config_cls, args or {}, path=path or f"{kind}.{name}"))


_default: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host (entry points loaded once)."""
    global _default
    if _default is None:
        _default = PluginHost()
    return _default


def build(kind: str, name: str, args: Mapping[str, Any] | None = None, *, path: str = "") -> Any:
    """Shortcut for ``get_host().build(...)``."""
    return get_host().build(kind, name, args, path=path)

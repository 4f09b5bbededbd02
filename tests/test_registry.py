"""The plugin registry: hooks, entry points, duplicates, unknown names, env switches."""

from __future__ import annotations

import types

import pytest

from medvlsam2.core.errors import PluginError
from medvlsam2.core.hookspecs import hookimpl
from medvlsam2.core.registry import KINDS, PluginHost, normalize_kind


def hook_module(**hooks):
    """A stand-in for a plugin distribution's hook module."""
    module = types.ModuleType("test_plugin_hooks")
    for name, function in hooks.items():
        setattr(module, name, hookimpl(function))
    return module


def test_builtins_registered_through_hooks_without_importing_them():
    import subprocess
    import sys

    host = PluginHost(entry_points=False)
    names = host.names("encoders")
    assert {"vit3d", "timm_slices", "sam2_hiera", "medsam_tinyvit", "deepbet_unet3d"} <= set(names)
    assert {"mlp", "spatial_pool_mlp", "perceiver"} <= set(host.names("projectors"))
    assert "hf_causal" in host.names("llms")
    assert {"sam2_volume", "prompt_unet"} <= set(host.names("decoders"))
    assert all(spec.provider == "medvlsam2" for spec in host.all_specs())
    # Listing is lazy: no plugin module is imported by it (checked in a fresh interpreter).
    code = (
        "import sys\n"
        "from medvlsam2.core.registry import PluginHost\n"
        "host = PluginHost(entry_points=False)\n"
        "mods = {s.target.partition(':')[0] for s in host.all_specs()}\n"
        "print(sorted(m for m in mods if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_glob_listing():
    host = PluginHost(entry_points=False)
    assert host.names("encoders", "vit*") == ["vit3d"]
    assert host.names("encoder", "*slices") == ["timm_slices"]


def test_unknown_name_lists_available_and_closest():
    host = PluginHost(entry_points=False)
    with pytest.raises(PluginError) as err:
        host.get("encoders", "vit_3d")
    message = str(err.value)
    assert "unknown encoder 'vit_3d'" in message
    assert "did you mean 'vit3d'?" in message
    assert "timm_slices" in message and "sam2_hiera" in message


def test_unknown_kind_has_closest_match():
    with pytest.raises(PluginError, match="did you mean 'decoders'"):
        normalize_kind("decoderz")
    assert normalize_kind("LLM") == "llms"
    assert set(KINDS) >= {"encoders", "llms", "decoders", "tasks"}


def test_third_party_plugin_registers_and_builds():
    class Echo:
        """Echo encoder for the test."""

        def __init__(self, **kwargs):
            self.kwargs = kwargs

    plugin = hook_module(register_encoders=lambda register: register("echo", Echo))
    host = PluginHost(entry_points=False, extra=[(plugin, "acme-plugins", "1.2")])
    spec = host.get("encoders", "echo")
    assert (spec.provider, spec.version, spec.summary) == ("acme-plugins", "1.2", "Echo encoder for the test.")
    assert host.build("encoders", "echo", {"depth": 3}).kwargs == {"depth": 3}


def test_duplicate_name_names_both_providers():
    plugin = hook_module(register_encoders=lambda register: register("vit3d", "acme.enc:ViT"))
    host = PluginHost(entry_points=False, extra=[(plugin, "acme-plugins", "1.0")])
    with pytest.raises(PluginError) as err:
        host.names("encoders")
    message = str(err.value)
    assert "duplicate encoder name 'vit3d'" in message
    assert "'medvlsam2'" in message and "'acme-plugins'" in message and "replace=True" in message


def test_replace_true_overrides_on_purpose():
    plugin = hook_module(register_encoders=lambda register: register("vit3d", "acme.enc:ViT", replace=True))
    host = PluginHost(entry_points=False, extra=[(plugin, "acme-plugins", "1.0")])
    assert host.get("encoders", "vit3d").provider == "acme-plugins"


def test_hook_without_spec_fails_check_pending():
    plugin = hook_module(register_encoder=lambda register: None)  # typo: no such hook
    host = PluginHost(entry_points=False, extra=[(plugin, "typo-plugins", "1.0")])
    with pytest.raises(Exception, match="register_encoder"):
        host.names("encoders")


def test_broken_plugin_reported_once_and_others_still_work(capsys):
    def broken(register):
        raise RuntimeError("boom at registration")

    plugin = hook_module(register_encoders=broken, register_tasks=broken)
    host = PluginHost(entry_points=False, extra=[(plugin, "broken-plugins", "0.1")])
    assert "vit3d" in host.names("encoders")
    assert host.names("tasks") == [n for n in host.names("tasks")]  # still answers
    assert host.failures == [("broken-plugins", "RuntimeError: boom at registration")]
    assert capsys.readouterr().err.count("broken-plugins") == 1


def test_unloadable_target_names_plugin_and_provider():
    plugin = hook_module(register_encoders=lambda register: register("ghost", "no_such_module.x:Enc"))
    host = PluginHost(entry_points=False, extra=[(plugin, "ghost-plugins", "0.1")])
    with pytest.raises(PluginError, match="encoder plugin 'ghost' from 'ghost-plugins' cannot be loaded"):
        host.build("encoders", "ghost")


def test_target_must_be_module_colon_attr():
    plugin = hook_module(register_encoders=lambda register: register("bad", "no_colon_here"))
    host = PluginHost(entry_points=False, extra=[(plugin, "bad-plugins", "0.1")])
    with pytest.raises(PluginError, match="must be 'module:attr'"):
        host.names("encoders")


def test_entry_point_plugin_is_listed_and_env_switches_filter_it():
    host = PluginHost(env={})
    assert host.get("encoders", "simple_cnn3d").provider == "medvlsam2-plugin-example"
    blocked = PluginHost(env={"MEDVLSAM2_DISABLE_PLUGINS": "medvlsam2-plugin-example"})
    assert "simple_cnn3d" not in blocked.names("encoders")
    allowed_other = PluginHost(env={"MEDVLSAM2_LOAD_PLUGINS": "some-other-dist"})
    assert "simple_cnn3d" not in allowed_other.names("encoders")
    assert "vit3d" in allowed_other.names("encoders")  # built-ins always load
    allowed = PluginHost(env={"MEDVLSAM2_LOAD_PLUGINS": "medvlsam2-plugin-example"})
    assert "simple_cnn3d" in allowed.names("encoders")


def test_trace_env_prints_hook_calls(capsys):
    PluginHost(entry_points=False, env={"MEDVLSAM2_TRACE_PLUGINS": "1"}).names("encoders")
    assert "register_encoders" in capsys.readouterr().err

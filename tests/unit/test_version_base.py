"""A registered version's base: named by its spec, the registering machine's directory a hint only. The hint is used
where it is still a complete model directory; otherwise the spec is resolved again (as prepare-base-model does)."""

import shutil

import pytest

from tasks.core.errors import ConfigError
from tasks.model.modeling import resolve_version_base


def test_the_hint_is_used_while_it_is_a_complete_model_directory_here(tiny_model_dir):
    # the spec is not even resolvable here: with the hint in place it is never looked at
    assert resolve_version_base("pkg://not_installed_pkg/x.gguf", str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_a_hint_that_is_gone_or_incomplete_falls_back_to_the_spec_resolved_again(tiny_model_dir, tmp_path):
    gone = tmp_path / "cache" / "models" / "cleared"
    assert resolve_version_base(str(tiny_model_dir), str(gone)) == str(tiny_model_dir.resolve())
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    assert resolve_version_base(str(tiny_model_dir), str(partial)) == str(tiny_model_dir.resolve())


def test_no_spec_and_no_hint_here_is_one_line_saying_so(tmp_path):
    with pytest.raises(ConfigError, match="names no base model spec .* is not on this machine; re-register"):
        resolve_version_base("", str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="train.base_model=pkg://not_installed_pkg/x.gguf: Python package "):
        resolve_version_base("pkg://not_installed_pkg/x.gguf", str(tmp_path / "gone"))

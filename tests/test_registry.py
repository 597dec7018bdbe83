"""Registries and conf groups agree: every key has a conf file and every conf file a key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tinyllm.errors import TinyLLMError
from tinyllm.model import ACTIVATIONS, NORMS, POSITIONS
from tinyllm.model.config import ModelConfig
from tinyllm.model.registry import lookup

REPO = Path(__file__).resolve().parents[1]
GROUPS = [("norm", NORMS), ("activation", ACTIVATIONS), ("pos", POSITIONS)]


@pytest.mark.parametrize("group, registry", GROUPS)
def test_registry_keys_match_conf_files(group: str, registry: dict) -> None:
    files = {p.stem for p in (REPO / "conf" / group).glob("*.yaml")}
    assert files == set(registry)


@pytest.mark.parametrize("group, registry", GROUPS)
def test_conf_files_select_their_own_key(group: str, registry: dict) -> None:
    fields = set(ModelConfig.__dataclass_fields__)
    for name in registry:
        path = REPO / "conf" / group / f"{name}.yaml"
        assert path.read_text().startswith("# @package model")
        values = yaml.safe_load(path.read_text())
        assert values[group] == name
        assert set(values) <= fields  # nothing a ModelConfig would reject


def test_lookup_lists_valid_names() -> None:
    assert lookup(NORMS, "rmsnorm", "norm") is NORMS["rmsnorm"]
    with pytest.raises(TinyLLMError, match="layernorm, rmsnorm") as e:
        lookup(NORMS, "groupnorm", "norm")
    assert "conf/norm/" in str(e.value)


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(norm="groupnorm"), "norm"),
        (dict(norm="groupnorm", qk_norm=True), "norm"),
        (dict(activation="tanh"), "activation"),
    ],
)
def test_builders_list_valid_names_without_validate(kw: dict, option: str) -> None:
    """A part built directly (no GPT, no validate()) still fails with the listing error."""
    from tinyllm.model.attention import CausalSelfAttention
    from tinyllm.model.gpt import Block

    cfg = ModelConfig(n_embd=32, n_head=2, **kw)
    build = CausalSelfAttention if kw.get("qk_norm") else Block
    with pytest.raises(TinyLLMError, match=f"Unknown model.{option} .*Valid choices"):
        build(cfg, 0)

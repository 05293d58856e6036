"""Defaults use current models from the SDK's own list, never one the SDK marks deprecated."""

from __future__ import annotations

from typing import get_args

from anthropic._data.deprecated_models import DEPRECATED_MODELS
from anthropic.types.model_param import ModelParam

from smallfirst.common.pricing import default_price_table


def _sdk_models() -> set[str]:
    literal, _str = get_args(ModelParam)
    return set(get_args(literal))


def test_models_of_the_lead_catalog_are_listed_by_the_sdk_and_not_deprecated() -> None:
    # given
    models = {"claude-haiku-5-5", "claude-sonnet-5-5"}

    # then
    assert models <= _sdk_models()
    assert not models & set(DEPRECATED_MODELS)


def test_every_frontier_model_of_the_embedded_catalog_is_current(catalog) -> None:
    # given
    models = {task.frontier.model for task in catalog.tasks()}

    # then
    assert models, "the embedded catalog binds no frontier model"
    assert models <= _sdk_models(), f"not in the SDK's model list: {models - _sdk_models()}"
    assert not models & set(DEPRECATED_MODELS), f"deprecated: {models & set(DEPRECATED_MODELS)}"


def test_every_model_of_the_embedded_price_table_is_current() -> None:
    # given
    models = set(default_price_table())

    # then
    assert models <= _sdk_models(), f"not in the SDK's model list: {models - _sdk_models()}"
    assert not models & set(DEPRECATED_MODELS), f"deprecated: {models & set(DEPRECATED_MODELS)}"

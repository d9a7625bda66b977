"""Unit-tier fixtures: every async test here runs under both asyncio and uvloop (STYLE.md §11).

pytest-asyncio 1.x parametrizes async tests over the loop factories this hook returns
(overriding the `event_loop_policy` fixture is deprecated there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}

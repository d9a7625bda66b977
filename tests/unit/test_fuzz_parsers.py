"""The fuzz tier: generated API-shaped documents against the parsers and the manifest loader.

Property: nothing but `InvalidObject` (for an object) or `ManifestError` (for a whole
file) ever comes out, whatever the input. Documents start from valid Services,
EndpointSlices and Nodes and get random values of every YAML/JSON type at random paths
(and random text edits, for the loader), so the generator reaches the typed accessors
the way a user's typo or a hostile file does. Bounded: derandomized, a fixed number of
examples, well under a minute in all.
"""

from __future__ import annotations

import copy
import datetime
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyproxy.config import ManifestLimits
from pyproxy.model.fields import InvalidObject
from pyproxy.model.objects import parse_endpoint_slice, parse_node, parse_service
from pyproxy.sources.manifests import ManifestError, load_manifests
from tests.unit.test_hostile_input import NODE, SERVICE, SLICE, paths

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True), st.text(max_size=30),
    st.sampled_from(["", "None", "TCP", "UDP", "SCTP", "Local", "Cluster", "ClientIP", "LoadBalancer", "NodePort",
                     "10.96.0.1", "::1", "fe80::1", "300.1.1.1", "IPv4", "IPv6", "FQDN", "web", "z1", "true"]),
    st.dates(), st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), children, max_size=4)),
    max_leaves=12,
)
TEMPLATES = [("Service", SERVICE), ("EndpointSlice", SLICE), ("Node", NODE)]
PARSE = {"Service": parse_service, "EndpointSlice": parse_endpoint_slice, "Node": parse_node}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, Any]:
    kind, template = draw(st.sampled_from(TEMPLATES))
    doc: Any = copy.deepcopy(template)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = list(paths(doc))
        path = draw(st.sampled_from(where))
        if not path:
            continue
        target = doc
        for step in path[:-1]:
            target = target[step]
        if isinstance(target, dict) and draw(st.booleans()) and len(path) > 1:
            del target[path[-1]]
        else:
            target[path[-1]] = draw(values)
    return kind, doc


def check_parse(kind: str, doc: Any) -> None:
    try:
        PARSE[kind](doc, report=lambda err: None)
    except InvalidObject as err:
        assert err.kind == kind and err.reason


@FUZZ
@given(mutated())
def test_parsers_raise_nothing_but_invalid_object(case: tuple[str, Any]) -> None:
    check_parse(*case)


@FUZZ
@given(st.sampled_from(list(PARSE)), values)
def test_parsers_take_any_value_at_all(kind: str, doc: Any) -> None:
    check_parse(kind, doc)


def _yaml_safe(value: Any) -> Any:
    """What yaml.safe_dump can write (it has no tag for every Python value we generate)."""
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return ".nan"
    return value


EDITS = ["&a ", "*a", "[", "]", "{", "}", ": ", "- ", "!!binary ", "!!set ", "<<: *a\n", "---\n", "\t", "'", '"',
         "!!python/object:os.system ", "%YAML 1.1\n", "? ", "|\n", "\x00", "\ufeff", "2026-13-45"]


@st.composite
def manifest_text(draw: st.DrawFn) -> str:
    docs = [_yaml_safe(draw(mutated())[1]) for _ in range(draw(st.integers(min_value=1, max_value=3)))]
    text = yaml.safe_dump_all(docs, default_flow_style=draw(st.booleans()))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.sampled_from(EDITS)) + text[at:]
    return text


@FUZZ
@given(manifest_text())
def test_the_loader_raises_nothing_but_manifest_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "fuzz.yaml").write_text(text, errors="surrogatepass")
        try:
            snapshot = load_manifests(Path(directory), "node1", limits=ManifestLimits(maxDepth=32))
        except ManifestError as err:
            assert "fuzz.yaml" in str(err)
            return
        for problem in snapshot.problems + snapshot.parts:
            assert problem.startswith("fuzz.yaml")


def test_dates_and_sets_from_yaml_are_values_like_any_other() -> None:
    doc = yaml.safe_load("kind: Service\nmetadata: {name: 2026-01-01}\nspec: !!set {a, b}\n")
    assert isinstance(doc["metadata"]["name"], datetime.date)
    check_parse("Service", doc)

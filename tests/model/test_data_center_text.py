"""Data-center names go into the geofeed (R10): one CSV line per prefix, nothing more."""

from __future__ import annotations

import pytest

from egressd.model.deployment import DeploymentError, load_deployment

TEMPLATE = """
[[data_centers]]
code = "las"
city = {city}
country = {country}
region = {region}
latitude = 36.1
longitude = -115.1
shared_ipv4 = ["198.51.100.10"]
"""


def load(city: str = '"Las Vegas"', country: str = '"US"', region: str = '"US-NV"') -> None:
    load_deployment(TEMPLATE.format(city=city, country=country, region=region))


def test_a_plain_data_center_loads() -> None:
    load()
    load(city='"São Paulo"', country='"BR"', region='"BR-SP"')


@pytest.mark.parametrize(("field", "kwargs"), [
    ("city", {"city": '"Las Vegas\\u2028evil,US,,x"'}),
    ("city", {"city": '"Las\\tVegas"'}),
    ("city", {"city": '" Las Vegas"'}),
    ("country", {"country": '"usa"'}),
    ("region", {"region": '"US-"'}),
    ("region", {"region": '"CA-ON"'}),
])
def test_text_that_would_break_the_geofeed_is_refused(field: str, kwargs: dict[str, str]) -> None:
    with pytest.raises(DeploymentError) as error:
        load(**kwargs)
    assert any(issue.path == f"data_centers[las].{field}" and issue.rule == "R10"
               for issue in error.value.issues), error.value
